"""Lossless compact transport of the default model's weights to a device machine.

The default model's weights are dequantized GGUF blocks (Q4_1 for linear layers, Q8_0 for the
embedding): every block of 32 values along the input dimension is d*q + m (or d*q) with fp16
d, m and 4-bit (8-bit) q. Re-encoding them that way takes 0.625 (1.06) bytes a value instead of
4, and decoding computes exactly what gguf's dequantizer computed, so the weights arrive
bit-identical (verified before sending). Blocks that do not fit are sent raw.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32


def _q4_1(blocks: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    lo, hi = blocks.min(1), blocks.max(1)
    m = lo.astype(np.float16)
    d = ((hi.astype(np.float64) - lo) / 15).astype(np.float16)
    safe = np.where(d == 0, np.float16(1), d).astype(np.float32)
    q = np.clip(np.rint((blocks - m.astype(np.float32)[:, None]) / safe[:, None]), 0, 15).astype(np.uint8)
    return {"d": d, "m": m, "q": (q[:, 0::2] | (q[:, 1::2] << 4))}, decode_q4_1(d, m, q)


def decode_q4_1(d: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (d.astype(np.float32)[:, None] * q.astype(np.float32)) + m.astype(np.float32)[:, None]


def _q8_0(blocks: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    d = (np.abs(blocks).max(1).astype(np.float64) / 127).astype(np.float16)
    safe = np.where(d == 0, np.float16(1), d).astype(np.float32)
    q = np.clip(np.rint(blocks / safe[:, None]), -127, 127).astype(np.int8)
    return {"d": d, "q": q}, decode_q8_0(d, q)


def decode_q8_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * d.astype(np.float32)[:, None]


SCHEMES = {"q4_1": _q4_1, "q8_0": _q8_0}


def encode(name: str, w: np.ndarray, scheme: str) -> dict[str, np.ndarray]:
    """Arrays (prefixed by ``name``) that ``decode`` turns back into exactly ``w``."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if scheme == "raw" or w.ndim != 2 or w.shape[1] % BLOCK:
        return {f"{name}|raw": w}
    blocks = w.reshape(-1, BLOCK)
    parts, back = SCHEMES[scheme](blocks)
    bad = np.nonzero((back.view(np.uint32) != blocks.view(np.uint32)).any(1))[0]
    out = {f"{name}|{scheme}|{k}": v for k, v in parts.items()}
    out[f"{name}|shape"] = np.asarray(w.shape)
    out[f"{name}|bad_idx"] = bad.astype(np.int64)
    out[f"{name}|bad_val"] = blocks[bad]
    return out


def decode(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {k.split("|")[0] for k in arrays}
    out = {}
    for name in sorted(names):
        if f"{name}|raw" in arrays:
            out[name] = arrays[f"{name}|raw"]
            continue
        if f"{name}|q4_1|d" in arrays:
            q = arrays[f"{name}|q4_1|q"]
            nib = np.empty((q.shape[0], BLOCK), dtype=np.uint8)
            nib[:, 0::2], nib[:, 1::2] = q & 0x0F, q >> 4
            blocks = decode_q4_1(arrays[f"{name}|q4_1|d"], arrays[f"{name}|q4_1|m"], nib)
        else:
            blocks = decode_q8_0(arrays[f"{name}|q8_0|d"], arrays[f"{name}|q8_0|q"])
        blocks[arrays[f"{name}|bad_idx"]] = arrays[f"{name}|bad_val"]
        out[name] = blocks.reshape(tuple(arrays[f"{name}|shape"]))
    return out
