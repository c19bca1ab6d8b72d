import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from sae_serve.errors import SaeFormatError, SpecError
from sae_serve.sae.features import FeatureCatalog, FeatureInfo


def catalog() -> FeatureCatalog:
    return FeatureCatalog(
        d_sae=10,
        features={2: FeatureInfo(label="french", tags=("language",), max_activation=4.5),
                  7: FeatureInfo(label="deception", tags=("safety",), max_activation=2.0, density=0.01)},
        watchlist=(7,),
    )


def test_round_trip_and_lookups(tmp_path: Path) -> None:
    cat = catalog()
    cat.save(tmp_path)
    loaded = FeatureCatalog.load(tmp_path, d_sae=10)
    assert loaded == cat
    assert loaded.resolve("french", "f") == 2
    assert loaded.resolve(9, "f") == 9
    assert loaded.with_tag("safety") == [7]
    assert loaded.info(3) == FeatureInfo()
    assert FeatureCatalog.load(tmp_path / "none", d_sae=4) == FeatureCatalog(d_sae=4)


def test_resolve_errors_name_the_field() -> None:
    with pytest.raises(SpecError, match=r"^req.feature: no feature is labelled 'german'"):
        catalog().resolve("german", "req.feature")
    with pytest.raises(SpecError, match=r"feature index 10 is outside 0..9"):
        catalog().resolve(10, "x")
    with pytest.raises(SpecError, match=r"outside"):
        catalog().resolve(-1, "x")


def test_bad_catalogs() -> None:
    with pytest.raises(ValidationError, match="label 'a' is used by features 1 and 2"):
        FeatureCatalog(d_sae=4, features={1: FeatureInfo(label="a"), 2: FeatureInfo(label="a")})
    with pytest.raises(ValidationError, match=r"outside 0..3"):
        FeatureCatalog(d_sae=4, watchlist=(4,))
    with pytest.raises(ValidationError, match="max_activation"):
        FeatureInfo(max_activation=float("nan"))


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "features.json").write_text("[1,")
    with pytest.raises(SaeFormatError, match="features.json: not valid JSON"):
        FeatureCatalog.load(tmp_path, 10)
    (tmp_path / "features.json").write_text(json.dumps({"d_sae": 10, "features": {"1": {"max_activation": -1}}}))
    with pytest.raises(SaeFormatError, match=r"features.json: field features.1.max_activation"):
        FeatureCatalog.load(tmp_path, 10)
    catalog().save(tmp_path)
    with pytest.raises(SaeFormatError, match="d_sae is 10 but the SAE has 12 features"):
        FeatureCatalog.load(tmp_path, 12)
