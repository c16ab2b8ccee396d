"""Shared by the DKIM unit tests (test_mailauth_dkim.py, test_mailauth_fastverify.py): the
signing time and a pair of keys, RSA and Ed25519, for example.com."""

from __future__ import annotations

import pytest

from mailappliance.mailauth import keys

NOW = 1_700_000_000


@pytest.fixture(scope="module")
def keypair(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    return (keys.generate(data, "example.com", "mail", "rsa"),
            keys.generate(data, "example.com", "ed", "ed25519"))
