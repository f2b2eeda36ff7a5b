"""Stable 64-bit string hashes for tie-breaking.

Python's ``hash(str)`` changes from process to process, so ties would be broken differently by every
API server. The tie-break instead hashes agent ids and tie keys with BLAKE2b (8-byte digest,
little-endian), which every process, and the plain-Python reference, computes the same way.
"""

from __future__ import annotations

from hashlib import blake2b


def stable_hash64(text: str) -> int:
    """BLAKE2b-64 of the UTF-8 bytes of ``text``, as an unsigned integer."""
    return int.from_bytes(blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
