"""Data types as rules: patterns, normalisers, masks and the built-in types. Pure functions, no
database and no HTTP: the registry service (app/services/data_types.py), the migration's built-ins
and the tests all read this.

Patterns run on RE2 (google-re2): matching is linear in the value's length whatever the pattern,
so an admin's pattern such as `(a+)+$` cannot stall a worker on a long value (Python's `re`
backtracks exponentially on it). RE2 refuses what it cannot run in linear time (backreferences,
lookaround): such a pattern is refused when it is registered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal, get_args

import re2  # google-re2: no type hints of its own
from re2 import _re2

Normalize = Literal["none", "strip_separators", "lowercase", "digits"]
Mask = Literal["last4", "ssn", "email", "year", "none"]
Reveal = Literal["plain", "masked"]
NORMALIZERS: tuple[Normalize, ...] = get_args(Normalize)
MASKS: tuple[Mask, ...] = get_args(Mask)
REVEALS: tuple[Reveal, ...] = get_args(Reveal)

# A pattern is an admin's input: bounded in length, and in the memory RE2 may use to compile it.
MAX_PATTERN_LENGTH = 1024
_RE2_MAX_MEM = 8 << 20

_ANCHOR_BOTH = _re2.RE2.Anchor.ANCHOR_BOTH
_SEPARATORS = frozenset(" -")
HIDDEN = "****"


class PatternError(ValueError):
    """The pattern is not one RE2 can run; the message says why (never a value)."""


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would print each refused pattern to stderr
    options.max_mem = _RE2_MAX_MEM
    options.never_capture = True  # a yes or a no is all we ask: no groups to track
    return options


class Pattern:
    """A compiled pattern that answers one question: does it match the whole value?

    It calls the package's RE2 binding (re2._re2) directly: the package's Python `fullmatch`
    builds a match object and maps byte offsets to characters on every call (about 20 µs on a
    licence number), where a yes or a no takes about 3 µs. The binding is the package's own
    interface under its Python layer; pyproject.toml keeps google-re2 below 2 for it."""

    __slots__ = ("_regexp",)

    def __init__(self, pattern: str) -> None:
        self._regexp = _re2.RE2(pattern.encode("utf-8"), _options())
        if not self._regexp.ok():
            reason = bytes(self._regexp.error()).decode("utf-8", "replace")
            raise PatternError(
                f"the pattern is not valid for RE2 (no backreferences or lookaround): {reason}"
            )

    def fullmatch(self, value: str) -> bool:
        raw = value.encode("utf-8")
        spans = self._regexp.Match(_ANCHOR_BOTH, raw, 0, len(raw))
        return bool(spans[0][0] != -1)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Pattern:
    """The compiled pattern (cached: the data path matches with it on every tokenize)."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"the pattern is longer than {MAX_PATTERN_LENGTH} characters")
    return Pattern(pattern)


# Normalisers: what a fingerprint (lookup by value) is computed over, so that `D1234 56789` and
# `D1234-56789` are one licence.


def normalise(kind: Normalize, value: str) -> str:
    if kind == "strip_separators":
        return "".join(char for char in value if char not in _SEPARATORS)
    if kind == "lowercase":
        return value.lower()
    if kind == "digits":
        return "".join(char for char in value if "0" <= char <= "9")
    return value


def normaliser(kind: Normalize) -> Callable[[str], str]:
    return functools.partial(normalise, kind)


# Masks: they hide the length as well as the value.


def mask(kind: Mask, value: str) -> str:
    if kind == "ssn":
        digits = [char for char in value if "0" <= char <= "9"]
        # The last four only of a whole SSN (nine digits): of anything else, nothing.
        return "***-**-" + "".join(digits[-4:]) if len(digits) == 9 else "***-**-****"
    if kind == "last4":
        return HIDDEN + value[-4:] if len(value) > 8 else HIDDEN
    if kind == "email":
        local, at, domain = value.rpartition("@")
        if not at or not local or not domain:
            return HIDDEN
        return f"{local[0]}***@{domain}"
    if kind == "year":
        year = value[:4]
        if len(value) >= 4 and year.isascii() and year.isdigit():
            return f"{year}-**-**"
        return HIDDEN
    return HIDDEN


# Checks a pattern cannot express, for built-in types.


def luhn_ok(value: str) -> bool:
    digits = [ord(char) - 48 for char in value if "0" <= char <= "9"]
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return bool(digits) and total % 10 == 0


def iso_date_ok(value: str) -> bool:
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


CHECKS: dict[str, Callable[[str], bool]] = {"CardNumber": luhn_ok, "DateOfBirth": iso_date_ok}


@dataclass(frozen=True, slots=True)
class DataTypeSpec:
    """One registered data type, as the data path reads it."""

    name: str
    builtin: bool
    pattern: str | None
    normalize: Normalize
    mask: Mask
    lookup: bool
    max_retention_days: int | None

    def accepts(self, value: str) -> bool:
        """Whether the value is one of this type: its pattern matches all of it (and, for a
        built-in, its check passes). A type without a pattern accepts any value."""
        if self.pattern is not None and not compile_pattern(self.pattern).fullmatch(value):
            return False
        check = CHECKS.get(self.name) if self.builtin else None
        return check is None or check(value)

    def normalised(self, value: str) -> str:
        return normalise(self.normalize, value)

    def masked(self, value: str) -> str:
        return mask(self.mask, value)


# The built-in types (the migration inserts the same rows: keep them equal, a test checks).
# Separators are a space or a dash; identifiers start and end with a letter or digit.
_ID = r"[A-Za-z0-9]"
BUILTINS: tuple[DataTypeSpec, ...] = (
    DataTypeSpec("SSN", True, r"\d{3}[ -]?\d{2}[ -]?\d{4}", "strip_separators", "ssn", True, None),
    DataTypeSpec(
        "DriverLicense",
        True,
        _ID + r"(?:[A-Za-z0-9 -]{0,30}" + _ID + ")?",
        "strip_separators",
        "last4",
        True,
        None,
    ),
    DataTypeSpec(
        "Passport", True, _ID + r"[A-Za-z0-9 -]{3,18}" + _ID, "strip_separators", "last4", True, None
    ),
    DataTypeSpec("Email", True, r"[^@\s]{1,64}@[^@\s.]+(?:\.[^@\s.]+)+", "lowercase", "email", True, None),
    DataTypeSpec("Phone", True, r"\+?[ ().-]*(?:\d[ ().-]*){7,15}", "digits", "last4", True, None),
    DataTypeSpec("DateOfBirth", True, r"\d{4}-\d{2}-\d{2}", "none", "year", False, None),
    DataTypeSpec(
        "AccountNumber", True, _ID + r"[A-Za-z0-9 -]{2,40}" + _ID, "strip_separators", "last4", True, None
    ),
    DataTypeSpec("CardNumber", True, r"\d(?:[ -]?\d){11,18}", "strip_separators", "last4", True, None),
    DataTypeSpec("Name", True, r"[^\p{Cc}]+", "none", "none", False, None),
    DataTypeSpec("Address", True, r"(?:[^\p{Cc}]|[\t\n\r])+", "none", "none", False, None),
)
BUILTIN_NAMES = frozenset(spec.name for spec in BUILTINS)


def custom_type(name: str) -> DataTypeSpec:
    """A custom type's defaults: no pattern, no normaliser, everything masked, no lookup."""
    return DataTypeSpec(name, False, None, "none", "none", False, None)
