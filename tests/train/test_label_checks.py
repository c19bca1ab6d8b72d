"""The label-check file is refused clearly when it is not what it should be."""

import json
from pathlib import Path

import pytest

from sae_serve.errors import SaeFormatError
from sae_serve.train.label_checks import read_checks


@pytest.mark.parametrize(("labels", "message"), [
    ({"x": {"positive": "one text", "negative": ["a"]}}, r"labels.x.positive: expected a non-empty list of texts"),
    ({"x": {"positive": ["a"], "negative": []}}, r"labels.x.negative: expected a non-empty list of texts"),
    ({"x": {"positive": ["a"]}}, "KeyError"),
])
def test_bad_check_files_are_refused_by_field(tmp_path: Path, labels: dict, message: str) -> None:
    path = tmp_path / "label_checks.json"
    path.write_text(json.dumps({"labels": labels}))
    with pytest.raises(SaeFormatError, match=message):
        read_checks(path)
