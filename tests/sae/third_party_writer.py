"""Run inside a throwaway environment that has sae-lens and eai-sparsify (tests/sae/test_third_party.py):
each library builds random SAEs, saves them its own way, and records its own encode and decode of
one input. Usage: python third_party_writer.py OUT_DIR"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

D, F = 16, 64


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, decoder rows of uneven norm (so decoder-norm options matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "b" in name.split(".")[-1][:2] else 1.0))


def record(folder: Path, x: torch.Tensor, acts: torch.Tensor, recon: torch.Tensor) -> None:
    save_file({"x": x, "acts": acts.detach().contiguous(), "recon": recon.detach().contiguous()},
              str(folder.with_name(folder.name + ".expected.safetensors")))


def saelens(out: Path, x: torch.Tensor) -> None:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="m", hook_name="blocks.4.hook_resid_post")
    cases = {
        "saelens-standard": StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, metadata=meta)),
        "saelens-topk-rescaled": TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=4, rescale_acts_by_decoder_norm=True,
                                                       metadata=meta)),
        "saelens-jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=False,
                                                          metadata=meta)),
        "saelens-layer-norm": StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, normalize_activations="layer_norm",
                                                            metadata=meta)),
        "saelens-hook-z": StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, reshape_activations="hook_z",
                                                        metadata=SAEMetadata(model_name="m",
                                                                             hook_name="blocks.4.attn.hook_z"))),
    }
    for seed, (name, sae) in enumerate(cases.items()):
        randomise(sae, seed)
        if name == "saelens-jumprelu":  # thresholds on both sides of zero
            with torch.no_grad():
                sae.threshold.copy_(torch.linspace(-0.5, 0.5, F))
        heads = x.view(len(x), 4, D // 4) if name == "saelens-hook-z" else x  # hook_z reads (heads, d_head)
        with torch.no_grad():
            acts = sae.encode(heads)
            recon = sae.decode(acts).reshape(x.shape)
        sae.save_model(str(out / name))
        record(out / name, x, acts, recon)


def sparsify(out: Path, x: torch.Tensor) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    cases = {"layers.4": SparseCoderConfig(num_latents=F, k=4),
             "transcoder/layers.4": SparseCoderConfig(num_latents=F, k=4, transcode=True),
             "skip/layers.4": SparseCoderConfig(num_latents=F, k=4, skip_connection=True)}
    for seed, (name, cfg) in enumerate(cases.items()):
        sae = SparseCoder(D, cfg, device="cpu", dtype=torch.float32)
        randomise(sae, 10 + seed)
        with torch.no_grad():
            enc = sae.encode(x)
            acts = torch.zeros(len(x), F).scatter(1, enc.top_indices, enc.top_acts)
            recon = sae.decode(enc.top_acts, enc.top_indices)
        folder = out / "sparsify" / name
        sae.save_to_disk(folder)
        record(folder, x, acts, recon)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    x = torch.randn(24, D, generator=torch.Generator().manual_seed(99))
    saelens(out, x)
    sparsify(out, x)
