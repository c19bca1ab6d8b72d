"""The shipped default SAE: its card holds up, its features are labelled, and clamping a labelled
feature steers the model toward the feature's concept (Scaling Monosemanticity's demonstration)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sae_serve import load_sae
from sae_serve.data import CONTRASTIVE_DIR, DEFAULT_SAE_DIR
from sae_serve.engines.hf import HFEngine
from sae_serve.sae.features import FeatureCatalog
from sae_serve.sae.registry import registry_of
from sae_serve.steering.spec import RequestSpec, resolve
from sae_serve.train.calibrate import context_chunks
from sae_serve.train.evaluate import reconstruction_metrics, splice_metrics

FRENCH_WORDS = [" le", " la", " les", " de", " des", " un", " une", " et", " est", " du"]
PROMPTS = ["My favourite food is", "The weather today is", "I went to the shop and bought",
           "The best thing about summer is"]


@pytest.fixture(scope="module")
def shipped():
    sae = load_sae(DEFAULT_SAE_DIR)
    return sae, FeatureCatalog.load(DEFAULT_SAE_DIR, sae.d_sae)


def test_shape_and_catalog(shipped) -> None:
    sae, catalog = shipped
    assert (sae.d_in, sae.d_sae, sae.hook_layer, sae.cfg.architecture) == (576, 4608, 15, "jumprelu")
    assert sum(info.max_activation is not None for info in catalog.features.values()) == 4608
    for label in ("non-english", "python-return", "soviet-russian", "wrongdoing"):
        catalog.resolve(label, "label")
    assert catalog.watchlist and all("safety" in catalog.info(f).tags for f in catalog.watchlist)


def test_card_numbers_recomputed_on_held_out_sample(shipped, hf_model) -> None:
    sae, _ = shipped
    model, _ = hf_model
    card = json.loads((DEFAULT_SAE_DIR / "model_card.json").read_text())
    sample = np.load(DEFAULT_SAE_DIR / "heldout_sample.npy").astype(np.int64)[:16]
    recon = reconstruction_metrics(sae, torch.cat(list(context_chunks(model, sample, 15))))
    assert recon.fvu == pytest.approx(card["reconstruction"]["fvu"], abs=0.05)
    assert recon.l0 == pytest.approx(card["reconstruction"]["l0"], abs=4)
    splice = splice_metrics(model, sae, sample)  # delta CE varies by context: 16 keep it within 0.1
    assert splice.delta_ce == pytest.approx(card["splice"]["delta_ce"], abs=0.1)
    # The goals of the dictionary-learning issue, on the card itself.
    assert card["reconstruction"]["fvu"] <= 0.25 and card["reconstruction"]["l0"] <= 64
    assert card["dead_fraction_over_calibration"] < 0.05 and card["splice"]["delta_ce"] <= 0.3


def test_clamping_french_makes_french_10x_likelier(shipped, hf_model) -> None:
    sae, catalog = shipped
    model, tokenizer = hf_model
    engine = HFEngine(model, tokenizer, registry_of({"layer15": sae}, {"layer15": catalog}))
    ids = sorted({tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in FRENCH_WORDS})
    spec = RequestSpec.model_validate({"steering": {"interventions": [
        {"sae": "layer15", "feature": "non-english", "mode": "clamp", "multiple_of_max": 1.0}]}})
    steered = resolve(spec, engine.registry)

    def french_mass(requests) -> torch.Tensor:
        return torch.stack([torch.softmax(lg[-1], -1)[ids].sum() for lg in engine.logits(PROMPTS, requests)])

    ratio = french_mass([steered] * 4) / french_mass(None)
    assert (ratio >= 10).all(), ratio
    [gen] = engine.generate(PROMPTS[:1], [steered], max_new_tokens=8)
    assert any(w in gen.text for w in (" la", " de", " le")), gen.text


def run_cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "sae_serve.cli", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_features_show_and_search_cli() -> None:
    shown = run_cli("features", "show", "non-english", "--examples", "2")
    assert "feature 4563  'non-english'" in shown and "max activation" in shown and "[[" in shown
    assert "label check:    precision 1.00, recall 1.00 on 8 held-out texts" in shown
    found = run_cli("features", "search", "--positive", str(CONTRASTIVE_DIR / "code.txt"),
                    "--negative", str(CONTRASTIVE_DIR / "neutral.txt"), "--top", "3")
    assert "python-return" in found
    bad = subprocess.run([sys.executable, "-m", "sae_serve.cli", "features", "show", "no-such-label"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no feature is labelled 'no-such-label'" in bad.stderr


@pytest.mark.slow
def test_every_shipped_label_holds_up_on_its_held_out_check(shipped, hf_model) -> None:
    """The figures in features.json are those its label_checks.json gives now, and every label
    separates its positives from its near misses (precision >= 0.75, recall >= 2/3)."""
    from sae_serve.train.label_checks import CHECKS_FILE, read_checks, validated_catalog

    sae, catalog = shipped
    model, tokenizer = hf_model
    checks = read_checks(DEFAULT_SAE_DIR / CHECKS_FILE)
    labelled = {info.label for info in catalog.features.values() if info.label}
    assert {c.label for c in checks} == labelled  # every shipped label is checked
    recomputed = validated_catalog(catalog, sae, model, tokenizer, checks, DEFAULT_SAE_DIR / CHECKS_FILE)
    for check in checks:
        index = catalog.resolve(check.label, "label")
        shipped_info, now = catalog.info(index), recomputed.info(index)
        assert (shipped_info.precision, shipped_info.recall) == (now.precision, now.recall), check.label
        assert now.precision >= 0.75 and now.recall >= 0.666, (check.label, now.precision, now.recall)
