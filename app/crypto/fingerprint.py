"""Keyed fingerprints: equal (normalised) values of one data type give equal fingerprints, and
without the key nobody can compute one, so the database alone cannot test guesses."""

from __future__ import annotations

import hashlib
import hmac

FINGERPRINT_KEY_BYTES = 32


def _prefixed(part: str) -> bytes:
    encoded = part.encode("utf-8")
    return len(encoded).to_bytes(4, "big") + encoded


def fingerprint(key: bytes, data_type: str, normalised_value: str) -> bytes:
    """HMAC-SHA256(key, len-prefixed data type || len-prefixed normalised value): the prefixes keep
    ("ab", "c") and ("a", "bc") apart."""
    if len(key) != FINGERPRINT_KEY_BYTES:
        raise ValueError("the fingerprint key must be 256 bits")
    return hmac.new(key, _prefixed(data_type) + _prefixed(normalised_value), hashlib.sha256).digest()
