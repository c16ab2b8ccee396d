"""vpopmail's crypt(3) hashes: verified at login, replaced by bcrypt at the first success;
disabled accounts never log in."""

from __future__ import annotations

import pytest

from mailappliance.users import legacy, passwords
from mailappliance.users.store import StoreError, UserStore

# Made by glibc's crypt(3) (libxcrypt) for the password "Secret-123": what vpopmail writes.
GLIBC = {
    "md5-crypt": "$1$saltsalt$5sWDyCQWwUZey5f5vLQ0V0",
    "sha256-crypt": "$5$saltsaltsaltsalt$AmZcP3nblT/rJAs4lZNo/TVhSoHlCY30pZLqw3abbY5",
    "sha512-crypt": "$6$rounds=5000$saltsalt$D7SHbVBNe6Z3Tq0r1N8iqqyVNuEUcNhD8lr8fIUcIMoarkD2Lw"
                    "gczwpCjnHL604IGufHERtS5lT07jK/pg53j1",
    "des-crypt": "abWn5hqBFnrgs",
}
SECRET = "Secret-123"


@pytest.mark.parametrize("kind, hashed", sorted(GLIBC.items()))
def test_glibc_hashes_verify_with_the_right_password_only(kind, hashed):
    assert legacy.identify(hashed) == kind
    assert legacy.verify(SECRET, hashed)
    assert passwords.verify_password(SECRET, hashed)
    assert not passwords.verify_password("Sacret-123", hashed)   # differs in 8 chars (DES)
    assert not passwords.verify_password("", hashed)
    assert passwords.needs_rehash(hashed)


def test_des_crypt_reads_eight_characters_as_crypt3_does():
    assert passwords.verify_password("Secret-1 anything after the eighth", GLIBC["des-crypt"])


@pytest.mark.parametrize("hashed", [
    "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",  # yescrypt
    "{SSHA}abcdefghijklmnop", "*", "!", "", "x", "$1$salt$short",
    "$6$rounds=99999999999$salt$" + "a" * 86,
])
def test_formats_we_cannot_verify_never_verify(hashed):
    assert legacy.identify(hashed) in (None,)
    assert not passwords.verify_password(SECRET, hashed)
    assert not passwords.needs_rehash(hashed)


def test_bcrypt_is_identified_but_never_rehashed():
    h = passwords.hash_password(SECRET, 4)
    assert legacy.identify(h) == "bcrypt"
    assert not passwords.needs_rehash(h)
    assert not legacy.verify(SECRET, h)      # bcrypt is passwords.py's job
    assert passwords.verify_password(SECRET, h)


def test_a_disabled_hash_never_verifies_even_with_the_old_password():
    for h in GLIBC.values():
        locked = passwords.DISABLED_PREFIX + h
        assert passwords.is_disabled(locked)
        assert not passwords.verify_password(SECRET, locked)
        assert not passwords.needs_rehash(locked)


def test_very_long_passwords_cost_nothing():
    assert not legacy.verify("x" * (legacy.MAX_LEGACY_PASSWORD_BYTES + 1), GLIBC["sha512-crypt"])


# --- the store: import with a hash, rehash at first login ----------------------------------------

@pytest.fixture
def store(tmp_path):
    s = UserStore(tmp_path / "data", bcrypt_cost=4)
    s.add_domain("example.com")
    yield s
    s.close()


@pytest.mark.parametrize("kind", sorted(GLIBC))
def test_first_login_replaces_the_legacy_hash_with_bcrypt_and_the_next_login_works(store, kind):
    store.add_user("joe@example.com", None, 0, password_hash=GLIBC[kind])
    assert store.get_user("joe@example.com").password_hash == GLIBC[kind]
    assert store.check_password("joe@example.com", "wrong-1") is None
    assert store.get_user("joe@example.com").password_hash == GLIBC[kind]   # not on failure
    user = store.check_password("joe@example.com", SECRET)
    assert user is not None and user.password_hash.startswith("$2")
    stored = store.get_user("joe@example.com").password_hash
    assert stored == user.password_hash and passwords.verify_password(SECRET, stored)
    assert store.check_password("joe@example.com", SECRET) is not None
    assert store.get_user("joe@example.com").password_hash == stored         # no more rewrites


def test_a_password_change_between_check_and_rehash_wins(store):
    store.add_user("joe@example.com", None, 0, password_hash=GLIBC["md5-crypt"])
    stale = store.get_user("joe@example.com")
    store.set_password("joe@example.com", "N3w-secret")
    assert store._rehash(stale, SECRET) is stale
    assert store.check_password("joe@example.com", "N3w-secret") is not None
    assert store.check_password("joe@example.com", SECRET) is None


def test_a_disabled_user_is_refused_and_listed_as_disabled(store):
    store.add_user("frank@example.com", None, 0,
                   password_hash=passwords.DISABLED_PREFIX + "$y$whatever")
    user = store.get_user("frank@example.com")
    assert user.disabled and user.maildir.is_dir()
    assert store.check_password("frank@example.com", "") is None
    assert store.check_password("frank@example.com", "$y$whatever") is None
    store.set_password("frank@example.com", "N3w-secret")
    assert not store.get_user("frank@example.com").disabled
    assert store.check_password("frank@example.com", "N3w-secret") is not None


def test_add_user_takes_a_password_or_a_hash_never_an_empty_one(store):
    with pytest.raises(StoreError):
        store.add_user("a@example.com", None, 0, password_hash="")
    with pytest.raises(StoreError):
        store.add_user("a@example.com", "Passw0rd!", 0, password_hash=GLIBC["md5-crypt"])
    assert store.get_user("a@example.com") is None
    # A hash is not held to the policy: the user keeps the password it had.
    store.add_user("a@example.com", None, 0, password_hash=GLIBC["des-crypt"])
    assert store.check_password("a@example.com", SECRET) is not None
