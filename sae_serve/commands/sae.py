"""``sae-serve sae check PATH``: will this SAE read this model? Before it is deployed.

Loads the SAE (any supported format), checks it against the model (width, layer), then encodes a
few hundred tokens of text at every layer's output: FVU near or above 1 at its site means the SAE
does not explain this model's residual stream there (a wrong model or normalisation), and another
layer fitting clearly better means a wrong layer. Exit 0: usable, 1: not.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from sae_serve.commands.common import add_corpus_arguments, add_model_argument

FAIL_FVU = 0.9
WARN_FVU = 0.5
WARN_DEAD = 0.5
OTHER_LAYER_BETTER = 0.8  # another layer's FVU below this fraction of the site's: the layer is wrong


@dataclass(frozen=True)
class Verdict:
    ok: bool
    notes: list[str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sae_command", required=True)
    check = sub.add_parser("check", help="Check an SAE against a model: shapes, layer, FVU, L0, dead features.")
    check.add_argument("path", help="SAE folder or params.npz (SAELens, sparsify, dictionary_learning, Gemma Scope)")
    check.add_argument("--hook-layer", type=int, default=None, help="the layer, for formats that do not record it")
    add_corpus_arguments(check, contexts=2)
    add_model_argument(check)


def judge(fvu: float, dead: float, l0: float, d_sae: int, best: tuple[int, float], site: int) -> Verdict:
    """``best``: the layer whose output the SAE reconstructs best, and its FVU."""
    notes = []
    wrong_layer = best[0] != site and best[1] < OTHER_LAYER_BETTER * fvu
    if wrong_layer:
        notes.append(f"the SAE reconstructs layer {best[0]}'s output better (FVU {best[1]:.3f}) than its own site, "
                     f"layer {site} (FVU {fvu:.3f}): is its hook_layer right?")
    if fvu >= FAIL_FVU:
        notes.append(f"FVU {fvu:.3f} >= {FAIL_FVU}: the SAE does not explain this model's residual stream at this "
                     "site (wrong layer, wrong model, or an input normalisation it expects)")
    elif fvu > WARN_FVU:
        notes.append(f"FVU {fvu:.3f} > {WARN_FVU}: a weak reconstruction; steering keeps the error term, but "
                     "features may not mean what their labels say")
    if dead > WARN_DEAD:
        notes.append(f"{dead:.0%} of features never fired on these tokens (a short sample: use --contexts for more)")
    if l0 > d_sae / 4:
        notes.append(f"L0 {l0:.0f} is over a quarter of the dictionary: not sparse here")
    return Verdict(fvu < FAIL_FVU and not wrong_layer, notes)


def run(args: argparse.Namespace) -> int:
    import torch

    from sae_serve.commands.common import corpus_contexts, load_model
    from sae_serve.errors import SaeMismatchError
    from sae_serve.sae.formats import load_sae
    from sae_serve.train.activations import every_layer_activations
    from sae_serve.train.evaluate import reconstruction_metrics

    sae = load_sae(args.path, hook_layer=args.hook_layer)
    model, tokenizer = load_model(args)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    print(f"SAE      {args.path}: {sae.cfg.architecture}, d_in {sae.d_in}, d_sae {sae.d_sae}, "
          f"{sae.hook_point} of layer {sae.hook_layer}, trained on {sae.cfg.model_name or 'an unrecorded model'}")
    if sae.d_in != hidden:
        raise SaeMismatchError(f"{args.path}: d_in={sae.d_in} but the model's hidden size is {hidden}")
    site = sae.site_layer
    if not 0 <= site < layers:
        raise SaeMismatchError(f"{args.path}: {sae.hook_point} of layer {sae.hook_layer} is not a decoder layer's "
                               f"output of this model (layers 0..{layers - 1})")
    contexts = torch.from_numpy(corpus_contexts(args, tokenizer, "heldout")).long()
    by_layer = [acts[:, 1:].reshape(-1, hidden) for acts in every_layer_activations(model, contexts)]
    fvus = [reconstruction_metrics(sae, acts).fvu for acts in by_layer]
    m = reconstruction_metrics(sae, by_layer[site])
    print(f"tokens   {m.tokens}\nFVU      {m.fvu:.4f}\nL0       {m.l0:.1f}\ndead     {m.dead_fraction:.3f}")
    best = min(range(layers), key=fvus.__getitem__)
    verdict = judge(m.fvu, m.dead_fraction, m.l0, sae.d_sae, (best, fvus[best]), site)
    for note in verdict.notes:
        print(f"note     {note}")
    print(f"verdict  {'usable' if verdict.ok else 'NOT USABLE'} with this model")
    return 0 if verdict.ok else 1
