"""The data types' pure rules: masks, normalisers, the built-in patterns and checks, and RE2."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from app.datatypes import (
    BUILTINS,
    DataTypeSpec,
    PatternError,
    compile_pattern,
    custom_type,
    iso_date_ok,
    luhn_ok,
    mask,
    normalise,
)

SPECS = {spec.name: spec for spec in BUILTINS}


@pytest.mark.parametrize(
    ("kind", "value", "masked"),
    [
        ("ssn", "078-05-1120", "***-**-1120"),
        ("ssn", "078051120", "***-**-1120"),
        ("ssn", "078 05 1120", "***-**-1120"),
        ("ssn", "1120", "***-**-****"),  # not a whole SSN: nothing shown
        ("ssn", "SENTINEL-SSN", "***-**-****"),
        ("ssn", "0780511201234", "***-**-****"),
        ("last4", "D1234-56789-01234", "****1234"),
        ("last4", "123456789", "****6789"),
        ("last4", "12345678", "****"),  # 8 or fewer: nothing shown
        ("last4", "1", "****"),
        ("last4", "ÅØÆ-ü-日本語テキスト", "****テキスト"),  # characters, not bytes
        ("email", "alice@example.com", "a***@example.com"),
        ("email", "Ünal@bank.example", "Ü***@bank.example"),
        ("email", "a@b.c", "a***@b.c"),
        ("email", "first.last+tag@sub.example.org", "f***@sub.example.org"),
        ("email", "a@b@example.com", "a***@example.com"),
        ("email", "no-at-sign", "****"),
        ("email", "@example.com", "****"),
        ("email", "alice@", "****"),
        ("year", "1984-05-12", "1984-**-**"),
        ("year", "198", "****"),
        ("year", "١٩٨٤-05-12", "****"),  # non-ASCII digits are not a year
        ("none", "Alice Smith", "****"),
        ("none", "", "****"),
    ],
)
def test_masks(kind: str, value: str, masked: str) -> None:
    assert mask(kind, value) == masked  # type: ignore[arg-type]


def test_masks_hide_the_length() -> None:
    for kind in ("last4", "none", "ssn"):
        assert len({mask(kind, "9" * n) for n in range(1, 9)}) == 1
    assert mask("last4", "A" * 9 + "1234") == mask("last4", "B" * 90 + "1234") == "****1234"


@pytest.mark.parametrize(
    ("kind", "value", "normalised"),
    [
        ("strip_separators", "D1234 56789-01234", "D12345678901234"),
        ("lowercase", "Alice@Example.COM", "alice@example.com"),
        ("digits", "+1 (555) 123-4567", "15551234567"),
        ("digits", "\u0665\u0665\u0665-1234", "1234"),  # ASCII digits only
        ("none", " As Is ", " As Is "),
    ],
)
def test_normalisers(kind: str, value: str, normalised: str) -> None:
    assert normalise(kind, value) == normalised  # type: ignore[arg-type]


def test_licence_numbers_with_spaces_or_dashes_normalise_alike() -> None:
    licence = SPECS["DriverLicense"]
    assert licence.normalised("D1234 56789") == licence.normalised("D1234-56789") == "D123456789"


def test_luhn_and_iso_dates() -> None:
    assert luhn_ok("4111 1111 1111 1111") and luhn_ok("79927398713")
    assert not luhn_ok("4111 1111 1111 1112") and not luhn_ok("")
    assert iso_date_ok("2000-02-29") and not iso_date_ok("1999-02-29") and not iso_date_ok("1984-13-01")


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("SSN", ["078-05-1120", "078051120", "078 05 1120"], ["SENTINEL-SSN", "078-05-112", "078-05-1120x"]),
        ("DriverLicense", ["D1234-56789-01234", "L-0001", "X"], ["", "-D1234", "D1234\n", "D1234_5"]),
        ("Passport", ["X12345678", "123 456 789"], ["X1", "X12345678\x00"]),
        ("Email", ["alice@example.com", "Ünal@bank.example"], ["alice", "alice@example", "a b@x.y"]),
        ("Phone", ["+1 (555) 123-4567", "5551234"], ["555-123", "call me", "+1 555 1234 5678 9012 34"]),
        ("DateOfBirth", ["1984-05-12", "2000-02-29"], ["1984-5-12", "1984-02-30", "12/05/1984"]),
        ("AccountNumber", ["GB82 WEST 1234 5698 7654 32", "0001234567"], ["12", "12_34"]),
        ("CardNumber", ["4111 1111 1111 1111", "4111-1111-1111-1111"], ["4111 1111 1111 1112", "4111"]),
        ("Name", ["Ana María O'Neil-Søren", "李小龍"], ["Ana\nMaría", "\x07"]),
        ("Address", ["1 Main St\nSpringfield", "Straße 5"], ["1 Main St\x1b[31m"]),
    ],
)
def test_builtin_patterns_match_whole_values(name: str, good: list[str], bad: list[str]) -> None:
    spec = SPECS[name]
    for value in good:
        assert spec.accepts(value), value
    for value in bad:
        assert not spec.accepts(value), value


def test_a_custom_type_without_a_pattern_accepts_any_value() -> None:
    assert custom_type("Note").accepts("anything at all \n")
    # A check belongs to the built-in only: a custom type named like one is not Luhn-checked.
    assert DataTypeSpec("CardNumber", False, None, "none", "none", False, None).accepts("1234")


def test_a_catastrophic_pattern_answers_at_once_and_correctly() -> None:
    spec = DataTypeSpec("Evil", False, "(a+)+$", "none", "none", False, None)
    started = time.perf_counter()
    assert spec.accepts("a" * 4096)
    assert not spec.accepts("a" * 4096 + "!")
    # Python's re takes longer than the age of the universe on the second; RE2 is linear.
    assert time.perf_counter() - started < 1.0


def test_patterns_re2_cannot_run_are_refused() -> None:
    for pattern in (r"(a)\1", r"(?=a)a", r"(?<!b)a", "(", "a{1001}", "x" * 2000):
        with pytest.raises(PatternError):
            compile_pattern(pattern)


def test_patterns_match_in_full_not_at_the_start() -> None:
    spec = DataTypeSpec("Code", False, r"[A-Z]{2}\d{2}", "none", "none", False, None)
    assert spec.accepts("AB12")
    assert not spec.accepts("AB123") and not spec.accepts("xAB12") and not spec.accepts("AB12\n")


def test_the_migration_registers_the_builtins_as_the_code_defines_them() -> None:
    path = Path(__file__).parent.parent / "migrations" / "versions" / "0004_registry_data_types.py"
    loaded = importlib.util.spec_from_file_location("registry_migration", path)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    in_code = [(s.name, s.pattern, s.normalize, s.mask, s.lookup) for s in BUILTINS]
    assert list(module.BUILTINS) == in_code
    assert {s.name for s in BUILTINS if s.lookup} == {
        "SSN", "DriverLicense", "Passport", "AccountNumber", "CardNumber", "Email", "Phone",
    }  # fmt: skip
