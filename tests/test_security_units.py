"""The password and ACL files' rules (``shoalmq.broker.security``), without a broker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shoalmq.broker.security import (READ, WRITE, Identity, PasswordHash, Security, filter_within, load_acl_file,
                                     load_password_file)
from shoalmq.errors import ConfigError


@pytest.mark.parametrize("sub, acl, within", [
    ("a/b", "a/b", True), ("a/b", "a/+", True), ("a/+", "a/+", True), ("a/+", "a/b", False),
    ("a/#", "a/#", True), ("a", "a/#", True), ("a/b/c", "a/#", True), ("a/#", "a/+", False),
    ("#", "#", True), ("$SYS/x", "#", False), ("$SYS/x", "$SYS/#", True), ("a/b", "a/b/c", False),
    ("+/b", "a/b", False), ("a/b/c", "a/+", False),
])
def test_a_subscription_lies_within_an_acl_filter_when_every_topic_it_matches_does(sub: str, acl: str,
                                                                                     within: bool) -> None:
    assert filter_within(sub.split("/"), acl.split("/")) is within


def test_hashes_as_mosquitto_passwd_writes_them(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "u7", "p7"], check=True, timeout=10)
    subprocess.run(["mosquitto_passwd", "-H", "sha512", "-b", str(path), "u6", "p6"], check=True, timeout=10)
    path.write_text(path.read_text() + "broken-line\nu9:$7$notanumber$x$y\n# a comment\n")
    users = load_password_file(path)
    assert set(users) == {"u7", "u6"}
    assert users["u7"].kind == "7" and users["u7"].verify(b"p7") and not users["u7"].verify(b"p6")
    assert users["u6"].kind == "6" and users["u6"].verify(b"p6") and not users["u6"].verify(b"")
    with pytest.raises(ValueError):
        PasswordHash.parse("plaintext")


def test_acl_rules_deny_first_then_grants_with_patterns(tmp_path: Path) -> None:
    path = tmp_path / "acl"
    path.write_text("topic read public/#\nuser alice\ntopic a/#\ntopic deny a/secret\n"
                    "pattern write out/%u\npattern read in/%c/#\n")
    security = Security(acl_file=path)
    alice, anon = Identity("c1", "alice"), Identity("c2", None)
    assert security.may(alice, "a/x", READ) and security.may(alice, "a/x", WRITE), "readwrite by default"
    assert not security.may(alice, "a/secret", READ), "deny first"
    assert security.may(alice, "out/alice", WRITE) and not security.may(alice, "out/alice", READ)
    assert not security.may(anon, "out/None", WRITE), "%u never matches a client without a username"
    assert security.may(anon, "in/c2/x", READ) and not security.may(anon, "in/c1/x", READ), "%c"
    assert security.may(anon, "public/news", READ) and not security.may(alice, "public/news", READ)
    assert security.may_subscribe(alice, "a/+") and not security.may_subscribe(alice, "a/secret")
    assert not security.may_subscribe(Identity("a/#", "x"), "in/a/#/y"), "a wildcard in a substitution"
    assert Security().may(anon, "anything", WRITE), "no ACL file: everything allowed"


@pytest.mark.parametrize("text, error", [
    ("bogus line\n", "line 1: expected 'topic', 'pattern' or 'user'"),
    ("topic read\n", "line 1: 'topic' needs a topic filter"),
    ("\nuser\n", "line 2: 'user' needs a name"),
    ("topic read a/#/b\n", "line 1: '#' must be the last level"),
])
def test_a_malformed_acl_file_is_refused_with_its_line(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "acl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_acl_file(path)


def test_a_username_nothing_vouches_for_is_anonymous_to_the_acl() -> None:
    import asyncio

    security = Security(allow_anonymous=True)
    assert asyncio.run(security.authenticate("alice", b"whatever", "127.0.0.1")) == (0, None)
    assert asyncio.run(Security().authenticate(None, None, "127.0.0.1")) == (0, None)
