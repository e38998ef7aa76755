"""Keyed fingerprints and the vault's own keys: the fingerprint key is made once through KMS,
stored wrapped, and the same for every process."""

from __future__ import annotations

import os
from typing import Any

import boto3
import psycopg
import pytest
from botocore.exceptions import ClientError

from app.crypto.fingerprint import fingerprint
from app.errors import VaultError
from app.services.vault_keys import FINGERPRINT, vault_key_context
from tests.conftest import ClientFactory

KEY = bytes(range(32))


def test_fingerprints_are_keyed_and_bind_the_data_type() -> None:
    assert fingerprint(KEY, "SSN", "123456789") == fingerprint(KEY, "SSN", "123456789")
    assert fingerprint(KEY, "SSN", "123456789") != fingerprint(bytes(32), "SSN", "123456789")
    assert fingerprint(KEY, "SSN", "123456789") != fingerprint(KEY, "Passport", "123456789")
    # Length prefixes: moving a character between type and value is another input.
    assert fingerprint(KEY, "ab", "c") != fingerprint(KEY, "a", "bc")
    assert len(fingerprint(KEY, "Email", "é@example.com")) == 32
    with pytest.raises(ValueError):
        fingerprint(b"short", "SSN", "1")


def test_the_fingerprint_key_is_made_once_wrapped_by_kms_and_shared_by_processes(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    first, _ = make_client(kms_key_id)
    second, _ = make_client(kms_key_id)

    key = first.fingerprint_key.key()

    assert len(key) == 32 and second.fingerprint_key.key() == key
    ((wrapped, kms_key_arn),) = db.execute("SELECT wrapped_key, kms_key_id FROM vault_keys").fetchall()
    assert (
        key not in wrapped
        and key.hex() not in repr(first.fingerprint_key)
        and str(key) not in repr(first.fingerprint_key)
    )
    kms = boto3.client("kms")
    context = vault_key_context(FINGERPRINT)
    assert context == {"purpose": "piivault-fingerprint"}
    assert (
        kms.decrypt(CiphertextBlob=wrapped, KeyId=kms_key_arn, EncryptionContext=context)["Plaintext"] == key
    )
    # Bound to its purpose: no customer's context opens it.
    with pytest.raises(ClientError):
        kms.decrypt(
            CiphertextBlob=wrapped,
            KeyId=kms_key_arn,
            EncryptionContext={"customerID": "12345", "dataType": "SSN"},
        )
    # A swapped wrapped key is refused, not used.
    db.execute("UPDATE vault_keys SET wrapped_key = %s", (os.urandom(len(wrapped)),))
    third, _ = make_client(kms_key_id)
    with pytest.raises(VaultError) as refused:
        third.fingerprint_key.key()
    assert refused.value.code == "record_integrity" and key.hex() not in str(refused.value)
