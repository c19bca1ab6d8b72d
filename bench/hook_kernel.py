"""The steering hook alone: time against dictionary size F, subset encoding vs full encode.

    python bench/hook_kernel.py [--tokens 64] [--features 8]

For ReLU/JumpReLU SAEs a request that clamps |S| features needs only the encoder columns of S
(DESIGN.md, "cost model"), so its time should stay flat as F grows; a full encode grows with F.
Each row: median of interleaved repetitions; ratio = full encode / subset at the same F.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from sae_serve.sae.model import SaeConfig, build_sae
from sae_serve.sae.registry import registry_of
from sae_serve.steering.hook import apply_plan
from sae_serve.steering.plan import RequestRows, build_plan, prepare
from sae_serve.steering.spec import RequestSpec, resolve


def make(d: int, f: int) -> object:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(f, d, generator=gen) / d**0.5
    return build_sae(SaeConfig("jumprelu", d, f, 0), {"W_enc": w.T.contiguous(), "b_enc": torch.zeros(f),
                                                      "W_dec": w, "b_dec": torch.zeros(d),
                                                      "threshold": torch.full((f,), 0.1)}, "bench")


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--features", type=int, default=8, help="|S|, features clamped")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="cuda: the SAE and activations on the GPU")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hook_kernel.jsonl"))
    args = parser.parse_args()
    rows = []
    for f in (4608, 16384, 65536, 262144):
        sae = make(args.d_model, f).to(args.device)
        reg = registry_of({"s": sae})
        clamp = [{"sae": "s", "feature": i * (f // args.features), "mode": "clamp", "value": 1.0}
                 for i in range(args.features)]
        subset = resolve(RequestSpec.model_validate({"steering": {"interventions": clamp}}), reg)
        full = resolve(RequestSpec.model_validate({"steering": {"interventions": clamp},
                                                   "return_features": {"sae": "s", "top_k": 1}}), reg)
        layout = [RequestRows(0, args.tokens, 0, args.tokens)]
        x = torch.randn(args.tokens, args.d_model, device=args.device)
        plans = {"subset": build_plan([prepare("s", subset, sae)], layout),
                 "full": build_plan([prepare("s", full, sae)], layout)}
        for plan in plans.values():
            apply_plan(x, sae, plan)  # warm-up
        t = {"subset": [], "full": []}
        for _ in range(3):  # interleave
            for name, plan in plans.items():
                t[name].append(timed(lambda p=plan, x=x, sae=sae: apply_plan(x, sae, p), args.reps))
        sub, ful = statistics.median(t["subset"]), statistics.median(t["full"])
        rows.append({"d_sae": f, "subset_ms": round(sub * 1e3, 4), "full_encode_ms": round(ful * 1e3, 4),
                     "full_over_subset": round(ful / sub, 1)})
        print(rows[-1], flush=True)
    result = {"bench": "hook_kernel", "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "tokens": args.tokens, "d_model": args.d_model, "features_clamped": args.features,
              "threads": torch.get_num_threads(), "rows": rows,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    with Path(args.out).open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
