import pytest
import torch
from pydantic import ValidationError

from sae_serve.errors import SpecError, field_path
from sae_serve.sae.features import FeatureCatalog, FeatureInfo
from sae_serve.sae.registry import registry_of
from sae_serve.steering.spec import RequestSpec, resolve
from tests.conftest import make_sae


@pytest.fixture
def registry():
    catalog = FeatureCatalog(d_sae=64, features={3: FeatureInfo(label="paris", max_activation=2.5),
                                                  9: FeatureInfo(label="nomax")})
    return registry_of({"l1": make_sae("relu")}, {"l1": catalog}, {"happy": ("l1", torch.ones(16)),
                                                                             "calm": ("l1", 2 * torch.ones(16))})


def parse(body: dict) -> RequestSpec:
    return RequestSpec.model_validate(body)


def iv(**kw) -> dict:
    return {"steering": {"interventions": [{"sae": "l1", **kw}]}}


def test_resolves_all_modes(registry) -> None:
    spec = parse({"steering": {"interventions": [
        {"sae": "l1", "feature": "paris", "mode": "clamp", "multiple_of_max": 10},
        {"sae": "l1", "feature": 4, "mode": "scale", "value": 0},
        {"sae": "l1", "feature": 5, "mode": "add", "value": -2},
        {"sae": "l1", "feature": 6, "mode": "clamp", "value": 1.5}],
        "vectors": [{"name": "happy", "coefficient": 2}, {"name": "calm", "coefficient": 0.5}],
        "positions": "generated"},
        "return_features": {"sae": "l1", "features": ["paris", 1]}})
    req = resolve(spec, registry)
    edit = req.edits["l1"]
    assert edit.features == (3, 4, 5, 6)
    assert edit.mult == (0.0, 0.0, 1.0, 0.0)
    assert edit.offset == (25.0, 0.0, -2.0, 1.5)
    assert req.applied[0].value == 25.0 and req.applied[0].label == "paris"
    torch.testing.assert_close(req.vectors["l1"], torch.full((16,), 3.0))
    assert req.positions == "generated"
    assert req.readout.features == (3, 1)
    assert not req.is_empty
    assert resolve(parse({}), registry).is_empty


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (iv(feature=1, mode="clamp"), "interventions[0]"),
        (iv(feature=1, mode="clamp", value=1, multiple_of_max=2), "interventions[0]"),
        (iv(feature=1, mode="add"), "interventions[0]"),
        (iv(feature=1, mode="scale", multiple_of_max=2, value=1), "interventions[0]"),
        (iv(feature=1, mode="boost", value=1), "interventions[0].mode"),
        (iv(feature=1, mode="add", value=float("nan")), "interventions[0].value"),
        (iv(feature=1, mode="add", value=float("inf")), "interventions[0].value"),
        (iv(feature=1, mode="add", value=1e9), "interventions[0].value"),
        (iv(feature=1, mode="clamp", multiple_of_max=1e5), "interventions[0].multiple_of_max"),
        (iv(feature=1.5, mode="add", value=1), "interventions[0].feature"),
        (iv(feature=True, mode="add", value=1), "interventions[0].feature"),
        (iv(feature=1, mode="add", value=1, path="/etc/passwd"), "interventions[0].path"),
        ({"steering": {"positions": "middle"}}, "steering.positions"),
        ({"return_features": {"sae": "l1"}}, "return_features"),
        ({"return_features": {"sae": "l1", "top_k": 0}}, "return_features.top_k"),
        ({"return_features": {"sae": "l1", "top_k": 2, "features": [1]}}, "return_features"),
        ({"steering": {"vectors": [{"name": "happy", "coefficient": float("nan")}]}}, "coefficient"),
    ],
)
def test_schema_errors_name_the_field(body: dict, loc: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(body)
    locs = [field_path(e["loc"]) for e in info.value.errors()]
    assert any(loc in x for x in locs), locs


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (iv(feature=1, mode="add", value=1) | {}, None, None),
        ({"steering": {"interventions": [{"sae": "l9", "feature": 1, "mode": "add", "value": 1}]}},
         "steering.interventions[0].sae", "unknown SAE 'l9'"),
        (iv(feature=64, mode="add", value=1), "steering.interventions[0].feature", "outside 0..63"),
        (iv(feature="london", mode="add", value=1), "steering.interventions[0].feature", "labelled 'london'"),
        (iv(feature="nomax", mode="clamp", multiple_of_max=3), "steering.interventions[0].multiple_of_max",
         "no calibrated max activation"),
        ({"steering": {"interventions": [{"sae": "l1", "feature": 3, "mode": "add", "value": 1},
                                         {"sae": "l1", "feature": "paris", "mode": "scale", "value": 0}]}},
         "steering.interventions[1].feature", "edited twice"),
        ({"steering": {"vectors": [{"name": "sad", "coefficient": 1}]}}, "steering.vectors[0].name",
         "unknown steering vector 'sad'"),
        ({"return_features": {"sae": "zz", "top_k": 3}}, "return_features.sae", "unknown SAE"),
        ({"return_features": {"sae": "l1", "features": [1, "zzz"]}}, "return_features.features[1]", "zzz"),
    ],
)
def test_resolution_errors_name_the_field(registry, body: dict, field: str | None, message: str | None) -> None:
    if field is None:
        resolve(parse(body), registry)
        return
    with pytest.raises(SpecError, match=message) as info:
        resolve(parse(body), registry)
    assert info.value.field == field
