"""The engine's tie hash, vectorised in numpy (uint64 arrays; no product overflows 64 bits).

Same definition as ``scoring._kernels._tie_hash``: a bijective mix of ``blake2b64(agent_id) ^
blake2b64(tie_key)``. The fleet already stores ``blake2b64(agent_id)`` (``id_hash``); the tie key
changes with every task, so peers compute these hashes per pick, inside the timed call.
"""

from __future__ import annotations

import numpy as np

M32 = np.uint64(0xFFFFFFFF)
C1, C2 = np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35)
S13, S16, S32 = np.uint64(13), np.uint64(16), np.uint64(32)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on uint64 values below 2**32."""
    h = h ^ (h >> S16)
    h = (h * C1) & M32
    h = h ^ (h >> S13)
    h = (h * C2) & M32
    return h ^ (h >> S16)


def tie_hash(id_hash: np.ndarray, key_hash: np.uint64) -> np.ndarray:
    """uint64 tie hash of each agent for one tie key; the lowest wins an exact tie."""
    x = id_hash ^ np.uint64(key_hash)
    a, b = x & M32, x >> S32
    hi = fmix32(b ^ fmix32(a))
    lo = fmix32(a ^ hi)
    return (hi << S32) | lo
