"""The server as users measure it: vLLM's own benchmark client against plain vLLM's OpenAI server and
against `sae-serve serve`, rounds interleaved, output tokens/s as ratios to plain in each round.

Variants on the sae_serve server (its default config: watchlist monitoring on): idle (no request
steers), clamp8 (every request clamps 8 features; each one is admitted, signed, and its worker reply
fetched on its first and last stream event), readout4 (every request streams its top-4 features per
token: a reply fetched for every event).
Prints one JSON line per round and a summary; appends it to bench/results/served.jsonl.

    python bench/served.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from statistics import median

CLAMP8 = {"steering": {"interventions": [
    {"sae": "layer15", "feature": f, "mode": "clamp", "value": 1.0}
    for f in (4563, 978, 914, 2857, 4263, 3261, 100, 2000)]}}
READOUT4 = {"return_features": {"sae": "layer15", "top_k": 4}}
VARIANTS = {"idle": None, "clamp8": CLAMP8, "readout4": READOUT4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {log.read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    sys.exit("server did not become healthy")


def bench(port: int, model: str, args: argparse.Namespace, extra: dict | None) -> float:
    """Output tokens/s of one run of vLLM's benchmark client."""
    code = ("import argparse; from vllm.benchmarks import serve; p = argparse.ArgumentParser(); "
            "serve.add_cli_args(p); serve.main(p.parse_args())")
    cmd = [sys.executable, "-c", code, "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
           "--endpoint", "/v1/completions", "--model", model, "--tokenizer", model, "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.prompts), "--max-concurrency", str(args.concurrency), "--ignore-eos"]
    if extra:
        cmd += ["--extra-body", json.dumps(extra)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    match = re.search(r"Output token throughput \(tok/s\):\s+([0-9.]+)", out.stdout)
    if out.returncode != 0 or not match:
        sys.exit(f"benchmark failed: {out.stdout[-1500:]} {out.stderr[-1500:]}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "served.jsonl"))
    args = parser.parse_args()
    from sae_serve.models import prepare_model

    model = str(prepare_model())
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    plain_port, sae_port = free_port(), free_port()
    common = ["--max-model-len", "1024", "--dtype", "float32"]
    plain = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port",
                   str(plain_port), *common], {**env, "VLLM_PLUGINS": "none"}, plain_port, logs / "plain.log")
    served = start([sys.executable, "-m", "sae_serve.cli", "serve", "--port", str(sae_port), "--grpc-port", "0",
                    "--", *common], env, sae_port, logs / "sae.log")
    rounds = []
    try:
        bench(plain_port, model, args, None)  # warm both
        bench(sae_port, model, args, CLAMP8)
        for r in range(args.rounds):
            base = bench(plain_port, model, args, None)
            rounds.append({"round": r, "plain_tok_s": base} | {
                name: round(bench(sae_port, model, args, extra) / base, 3) for name, extra in VARIANTS.items()})
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        for proc in (plain, served):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    result = {"bench": "served", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "prompts": args.prompts, "concurrency": args.concurrency, "input_len": args.input_len,
              "output_len": args.output_len, "rounds": rounds,
              "median": {k: median(r[k] for r in rounds) for k in VARIANTS}}
    print(json.dumps(result["median"]))
    with Path(args.out).open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
