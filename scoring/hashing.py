"""Stable 64-bit string hashes for tie-breaking.

Python's ``hash(str)`` changes from process to process, so ties would be broken differently by every
API server. The tie-break instead hashes agent ids and tie keys with BLAKE2b (8-byte digest,
little-endian), which every process, and the plain-Python reference, computes the same way.

Only valid Unicode has UTF-8 bytes: the records (:mod:`scoring.models`) reject strings with lone
surrogates before anything is hashed, and this function refuses them too, with a ``ValueError``
rather than the codec's ``UnicodeEncodeError``, in case a caller skips the records.
"""

from __future__ import annotations

from hashlib import blake2b


def stable_hash64(text: str) -> int:
    """BLAKE2b-64 of the UTF-8 bytes of ``text``, as an unsigned integer.

    Raises
    ------
    TypeError
        ``text`` is not a string.
    ValueError
        ``text`` is not valid Unicode (it holds a lone surrogate).
    """
    if not isinstance(text, str):
        raise TypeError(f"can only hash a string, got {type(text).__name__}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"cannot hash a string that is not valid Unicode (lone surrogate at index {e.start})"
        ) from None
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")
