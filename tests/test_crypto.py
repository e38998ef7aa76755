"""The envelope format and the local development key provider, on their own."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from app.crypto.envelope import FORMAT_VERSION, RecordBinding, open_sealed, seal
from app.crypto.keys import DataKey, canonical_context, length_prefixed
from app.crypto.local import (
    LocalKeyProvider,
    create_local_key_version,
    load_or_create_master_key,
    local_key_versions,
)
from app.errors import IntegrityFailure, KeyAccessDenied, KeyNotAllowed

KEY = bytes(range(32))
BINDING = RecordBinding("tok_abc", "12345", "DriverLicense")


def test_seal_and_open_round_trip_with_a_fresh_nonce_each_time() -> None:
    first, second = seal(KEY, b"secret", BINDING), seal(KEY, b"secret", BINDING)
    assert first != second
    assert first[0] == FORMAT_VERSION
    assert first[1:13] != second[1:13]  # 96-bit random nonces
    assert open_sealed(KEY, first, BINDING) == b"secret"


@pytest.mark.parametrize(
    "other",
    [
        RecordBinding("tok_abd", "12345", "DriverLicense"),
        RecordBinding("tok_abc", "67890", "DriverLicense"),
        RecordBinding("tok_abc", "12345", "SSN"),
        # Field boundaries are part of the encoding: moving a character across them changes it.
        RecordBinding("tok_abc1", "2345", "DriverLicense"),
    ],
)
def test_a_sealed_value_opens_only_under_its_own_binding(other: RecordBinding) -> None:
    with pytest.raises(IntegrityFailure):
        open_sealed(KEY, seal(KEY, b"secret", BINDING), other)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda blob: blob[:-1],
        lambda blob: bytes([2]) + blob[1:],
        lambda blob: blob[:5] + bytes([blob[5] ^ 1]) + blob[6:],
        lambda blob: b"",
        lambda blob: blob[:12],
    ],
)
def test_any_damage_is_one_opaque_error(mangle: object) -> None:
    blob = seal(KEY, b"secret", BINDING)
    with pytest.raises(IntegrityFailure) as raised:
        open_sealed(KEY, mangle(blob), BINDING)  # type: ignore[operator]
    assert "secret" not in str(raised.value)


def test_wrong_data_key_fails_opaquely() -> None:
    with pytest.raises(IntegrityFailure):
        open_sealed(bytes(32), seal(KEY, b"secret", BINDING), BINDING)


def test_length_prefixing_is_unambiguous() -> None:
    assert length_prefixed("ab", "c") != length_prefixed("a", "bc")
    assert canonical_context({"b": "2", "a": "1"}) == canonical_context({"a": "1", "b": "2"})


def test_data_key_repr_hides_the_key() -> None:
    key = DataKey(plaintext=b"\x01" * 32, wrapped=b"\x02" * 40, key_id="k", request_id="r")
    assert "\\x01" not in repr(key) and "plaintext" not in repr(key)


def test_local_master_key_is_created_owner_only_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "dev-master.key"
    first = load_or_create_master_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_master_key(path) == first
    os.chmod(path, 0o644)
    with pytest.raises(KeyAccessDenied):
        load_or_create_master_key(path)


def test_local_provider_binds_wrapped_keys_to_their_context(tmp_path: Path) -> None:
    provider = LocalKeyProvider.from_file(tmp_path / "dev-master.key")
    context = {"customerID": "12345", "dataType": "DriverLicense"}
    data_key = asyncio.run(provider.generate_data_key(context))
    assert data_key.key_id == provider.key_id
    assert len(data_key.plaintext) == 32 and data_key.plaintext not in data_key.wrapped

    def unwrap(wrapped: bytes, context: dict[str, str], key_id: str = provider.key_id) -> bytes:
        return asyncio.run(provider.decrypt_data_key(wrapped, context, key_id=key_id)).plaintext

    assert unwrap(data_key.wrapped, context) == data_key.plaintext
    for wrong in ({"customerID": "67890", "dataType": "DriverLicense"}, {"customerID": "12345"}, {}):
        with pytest.raises(IntegrityFailure):
            unwrap(data_key.wrapped, wrong)
    with pytest.raises(IntegrityFailure):
        unwrap(data_key.wrapped[:-1] + bytes([data_key.wrapped[-1] ^ 1]), context)
    other = LocalKeyProvider.from_file(tmp_path / "other.key")
    # Another master key's record is refused as such, not reported as tampering...
    with pytest.raises(KeyNotAllowed):
        unwrap(asyncio.run(other.generate_data_key(context)).wrapped, context, other.key_id)
    # ...while a wrapped key that claims this master key but was made under another fails whole.
    with pytest.raises(IntegrityFailure):
        unwrap(asyncio.run(other.generate_data_key(context)).wrapped, context)
    assert "key_id" in repr(provider) and str(KEY) not in repr(provider)


def test_local_provider_rewraps_under_the_same_context(tmp_path: Path) -> None:
    provider = LocalKeyProvider.from_file(tmp_path / "dev-master.key")
    context = {"customerID": "12345", "dataType": "SSN"}
    made = asyncio.run(provider.generate_data_key(context))
    key_id = provider.key_id
    rewrapped = asyncio.run(
        provider.reencrypt_data_key(made.wrapped, context, key_id=key_id, to_key_id=key_id)
    )
    assert rewrapped.plaintext == b"" and rewrapped.wrapped != made.wrapped
    opened = asyncio.run(provider.decrypt_data_key(rewrapped.wrapped, context, key_id=key_id))
    assert opened.plaintext == made.plaintext
    with pytest.raises(IntegrityFailure):
        asyncio.run(
            provider.reencrypt_data_key(made.wrapped, {"customerID": "6"}, key_id=key_id, to_key_id=key_id)
        )


def test_local_provider_warns_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    LocalKeyProvider.from_file(tmp_path / "dev-master.key")
    assert "LOCAL DEVELOPMENT KEY PROVIDER" in caplog.text


def test_local_key_versions_wrap_under_the_newest_and_open_under_the_one_named(tmp_path: Path) -> None:
    context = {"customerID": "12345", "dataType": "SSN"}
    first = LocalKeyProvider.from_directory(tmp_path)
    made = asyncio.run(first.generate_data_key(context))
    version, second_id = create_local_key_version(tmp_path)
    assert version == 2 and local_key_versions(tmp_path) == [1, 2]

    both = LocalKeyProvider.from_directory(tmp_path)

    assert both.key_id == second_id != first.key_id
    assert both.allowed_arns() == {first.key_id, second_id}
    assert both.allowed_arn_for("local:1") == first.key_id
    assert both.allowed_arn_for("local:2") == second_id == both.allowed_arn_for(second_id)
    for unknown in ("local:3", "local:0", "local:x", "arn:aws:kms:eu-west-1:1:key/k"):
        with pytest.raises(KeyNotAllowed):
            both.allowed_arn_for(unknown)
    assert asyncio.run(both.generate_data_key(context)).key_id == second_id
    opened = asyncio.run(both.decrypt_data_key(made.wrapped, context, key_id=first.key_id))
    assert opened.plaintext == made.plaintext
    moved = asyncio.run(
        both.reencrypt_data_key(made.wrapped, context, key_id=first.key_id, to_key_id=second_id)
    )
    assert moved.key_id == second_id and moved.plaintext == b""
    # Under version 2 only: claiming version 1 fails whole, as a swapped key would.
    with pytest.raises(IntegrityFailure):
        asyncio.run(both.decrypt_data_key(moved.wrapped, context, key_id=first.key_id))
    (tmp_path / "dev-master.key").unlink()
    retired = LocalKeyProvider.from_directory(tmp_path)
    assert retired.allowed_arns() == {second_id}
    assert asyncio.run(retired.decrypt_data_key(moved.wrapped, context, key_id=second_id)).plaintext == (
        made.plaintext
    )
    with pytest.raises(KeyNotAllowed):
        asyncio.run(retired.decrypt_data_key(made.wrapped, context, key_id=first.key_id))


def test_local_key_files_other_than_versions_are_ignored(tmp_path: Path) -> None:
    LocalKeyProvider.from_directory(tmp_path)
    for stray in ("dev-master.1.key", "dev-master.02.key", "dev-master.key.bak", "other.key"):
        (tmp_path / stray).write_bytes(b"\0" * 32)
    assert local_key_versions(tmp_path) == [1]
