"""Neuronpedia explanation exports into features.json, as `features import-labels` does."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from sae_serve.cli import main
from sae_serve.errors import SaeFormatError
from sae_serve.sae.features import FeatureCatalog, FeatureInfo
from sae_serve.sae.formats import save_sae
from sae_serve.sae.labels import import_labels, label_from, read_explanations
from tests.conftest import make_sae


def _row(index: int, description: str, layer: str = "6-res-jb", score: float | None = None) -> dict:
    """A row of a Neuronpedia batch-N.jsonl.gz (index is a string there)."""
    return {"modelId": "gpt2-small", "layer": layer, "index": str(index), "description": description,
            "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair", "scoreV1": score}


def test_best_description_per_feature_and_unique_labels(tmp_path: Path) -> None:
    rows = [_row(3, "references to the French language", score=0.2), _row(3, "French words", score=0.7),
            _row(5, "French words"), _row(9, "closing brackets in Python code"), _row(4, "other SAE", "7-res-jb")]
    catalog = FeatureCatalog(d_sae=64, features={1: FeatureInfo(label="mine", tags=("safety",)),
                                                 9: FeatureInfo(label="kept", max_activation=2.0)})
    with pytest.raises(SaeFormatError, match="several SAEs"):
        import_labels(catalog, rows, tmp_path)
    got, count = import_labels(catalog, rows, tmp_path, "gpt2-small/6-res-jb")
    assert count == 3 and got.resolve("french-words", "f") == 3  # the better-scored of two
    assert got.resolve("french-words-5", "f") == 5  # the same words: made unique
    assert got.info(9).label == "kept" and got.info(9).max_activation == 2.0  # curated labels stay
    assert got.info(9).description == "closing brackets in Python code"
    assert got.info(1).tags == ("safety",) and 4 not in got.features
    replaced, _ = import_labels(catalog, rows, tmp_path, "gpt2-small/6-res-jb", overwrite=True)
    assert replaced.info(9).label == "closing-brackets-in-python-code"
    with pytest.raises(SaeFormatError, match="row 0: index 99 is outside 0..63"):
        import_labels(catalog, [_row(99, "x")], tmp_path)
    assert label_from("  Mentions of 'Paris' & FRANCE!! ") == "mentions-of-paris-france"


def test_the_cli_imports_jsonl_gz_and_arrays_then_steers_by_label(tmp_path: Path, capsys) -> None:
    save_sae(make_sae("relu", 16, 64), tmp_path / "sae")
    export = tmp_path / "batch-0.jsonl.gz"
    export.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in [_row(7, "Capital cities")]).encode()))
    assert main(["features", "import-labels", str(export), "--sae", str(tmp_path / "sae")]) == 0
    assert "1 features described" in capsys.readouterr().out
    assert FeatureCatalog.load(tmp_path / "sae", 64).resolve("capital-cities", "f") == 7
    (tmp_path / "export.json").write_text(json.dumps([_row(8, "Numbers")]))
    assert read_explanations(tmp_path / "export.json")[0]["index"] == "8"
    (tmp_path / "bad.json").write_text("{oops")
    assert main(["features", "import-labels", str(tmp_path / "bad.json"), "--sae", str(tmp_path / "sae")]) == 2
    assert "bad.json: not JSON or JSON lines" in capsys.readouterr().err


def test_the_saes_own_neuronpedia_id_picks_its_rows(tmp_path: Path, capsys) -> None:
    """SAELens records the id in cfg.json (metadata.neuronpedia_id since v6)."""
    save_sae(make_sae("relu", 16, 64), tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["metadata"]["neuronpedia_id"] = "gpt2-small/7-res-jb"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "all.json").write_text(json.dumps([_row(3, "Wrong SAE"), _row(4, "Right SAE", "7-res-jb")]))
    assert main(["features", "import-labels", str(tmp_path / "all.json"), "--sae", str(tmp_path / "sae")]) == 0
    catalog = FeatureCatalog.load(tmp_path / "sae", 64)
    assert catalog.resolve("right-sae", "f") == 4 and 3 not in catalog.features


def test_labels_stay_unique_and_indices_must_be_indices(tmp_path: Path) -> None:
    catalog = FeatureCatalog(d_sae=64)
    rows = [_row(5, "x 10"), _row(1, "x"), _row(10, "x")]  # "x-10" made for 5, then wanted again for 10
    got, _ = import_labels(catalog, rows, tmp_path)
    assert len({got.info(i).label for i in (1, 5, 10)}) == 3
    with pytest.raises(SaeFormatError, match="row 0: field index must be a feature index, got 3.7"):
        import_labels(catalog, [{**_row(3, "y"), "index": 3.7}], tmp_path)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00corrupt")
    with pytest.raises(SaeFormatError, match="not a readable export"):
        read_explanations(tmp_path / "bad.jsonl.gz")
