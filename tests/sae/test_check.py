"""``sae-serve sae check``: the verdict a user gets before deploying an SAE on a model."""

from pathlib import Path

import pytest

from sae_serve.cli import main
from sae_serve.data import CONTRASTIVE_DIR, DEFAULT_SAE_DIR
from sae_serve.sae.formats import save_sae
from tests.conftest import make_sae


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted(CONTRASTIVE_DIR.glob("*.txt"))))
    return path


def _check(capsys, corpus: Path, *args: str) -> tuple[int, str]:
    code = main(["sae", "check", *args, "--corpus-file", str(corpus)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.slow
def test_the_shipped_sae_reads_the_default_model_and_a_wrong_layer_does_not(capsys, corpus, default_model_dir) -> None:
    code, out = _check(capsys, corpus, str(DEFAULT_SAE_DIR))
    fvu = float(out.split("FVU")[1].split()[0])
    assert code == 0 and "verdict  usable" in out and fvu < 0.5, out
    code, out = _check(capsys, corpus, str(DEFAULT_SAE_DIR), "--hook-layer", "3")
    assert code == 1 and "NOT USABLE" in out and "reconstructs layer 15's output better" in out, out


def test_a_width_mismatch_is_named(capsys, corpus, tmp_path, default_model_dir) -> None:
    save_sae(make_sae("relu", 16, 64, hook_layer=3), tmp_path / "narrow")
    code, out = _check(capsys, corpus, str(tmp_path / "narrow"))
    assert code == 2 and "d_in=16 but the model's hidden size is 576" in out
