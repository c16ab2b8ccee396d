"""users/store.py: an address is a user or an alias, never both; `domain del` keeps mail
unless forced."""

from __future__ import annotations

import json

import pytest

from mailappliance.smtp.binding import may_send_as
from mailappliance.users.store import StoreError, UserStore

PW = "Passw0rd!"


@pytest.fixture
def store(tmp_path):
    s = UserStore(tmp_path / "var", bcrypt_cost=4)
    s.add_domain("test.com")
    s.add_user("test@test.com", PW)
    yield s
    s.close()


def test_a_user_where_an_alias_is_is_refused_and_the_other_way_round(store):
    store.add_alias("info@test.com", ["test@test.com"])
    with pytest.raises(StoreError) as e:
        store.add_user("info@test.com", PW)
    assert str(e.value) == ("info@test.com is an alias (-> test@test.com); delete it first "
                            "with `alias del info@test.com`")
    with pytest.raises(StoreError) as e:
        store.add_alias("test@test.com", ["elsewhere@example.org"])
    assert str(e.value).startswith("test@test.com is a user; an alias")
    with pytest.raises(StoreError):             # the role aliases count too
        store.add_user("postmaster@test.com", PW)
    store.del_alias("postmaster@test.com")
    store.add_user("postmaster@test.com", PW)
    assert store.get_user("info@test.com") is None
    assert store.get_alias("test@test.com") is None


def test_a_first_user_with_a_role_name_gets_no_alias_over_it(tmp_path):
    s = UserStore(tmp_path / "v", bcrypt_cost=4)
    s.add_domain("role.example")
    s.add_user("abuse@role.example", PW)
    assert dict(s.list_aliases()) == {"mailer-daemon@role.example": ["abuse@role.example"],
                                      "postmaster@role.example": ["abuse@role.example"]}
    assert s.shadowed_aliases() == set()


def test_an_old_collision_is_not_used_and_is_shown(store):
    store.add_user("boss@test.com", PW)
    # As an older version let it happen: the alias row written beside the user.
    with store._db() as db:
        db.execute("INSERT INTO aliases(domain, local, targets) VALUES (?,?,?)",
                   ("test.com", "boss", json.dumps(["test@test.com"])))
    assert store.shadowed_aliases() == {"boss@test.com"}
    assert store.get_alias("boss@test.com") is None
    assert store.lookup_recipient("boss@test.com") == "user"
    # test@ could send as boss@ through the dead alias before; not any more
    assert not may_send_as("boss@test.com", "test@test.com", store.get_alias)


def deliver_file(store, address, name):
    local, domain = address.split("@")
    (store.maildir_for(local, domain) / "new" / name).write_bytes(b"Subject: x\n\nx\n")


def test_domain_del_refuses_while_mail_is_stored_unless_forced(store):
    deliver_file(store, "test@test.com", "1.msg")
    store.add_user("b@test.com", PW)
    deliver_file(store, "b@test.com", "2.msg")
    with pytest.raises(StoreError) as e:
        store.del_domain("test.com")
    assert str(e.value) == ("domain test.com has 2 messages in its mailboxes; "
                            "`domain del test.com --force` deletes them too")
    assert store.has_domain("test.com") and store.get_user("b@test.com") is not None
    assert store.count_domain_mail("test.com") == 2
    assert store.del_domain("test.com", force=True) == 2
    assert not store.has_domain("test.com")
    assert not (store.domains_dir / "test.com").exists()


def test_domain_del_without_mail_needs_no_force(store):
    assert store.del_domain("test.com") == 0
    with pytest.raises(StoreError, match="no such domain"):
        store.del_domain("test.com")
