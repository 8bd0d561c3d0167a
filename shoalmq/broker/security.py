"""Who may connect and what they may touch: mosquitto's password and ACL files, TLS contexts, and the rule that an
unauthenticated broker listens only on loopback.

- **Password file** (``password_file``): mosquitto's format, one ``user:hash`` per line, as ``mosquitto_passwd``
  writes it: ``$7$<iterations>$<salt>$<hash>`` (PBKDF2-HMAC-SHA512, 64 bytes) or ``$6$<salt>$<hash>``
  (SHA-512 of password then salt), salt and hash in base64. A line that cannot be read is logged with its number and
  skipped. Checks run off the event loop (PBKDF2 is slow on purpose) in one thread of their own, at most
  ``CHECKS_PER_ADDRESS`` at a time per client address, so a flood of bad CONNECTs from one address waits behind
  itself, not in front of everyone; results are remembered (keyed by a keyed hash of the password, never the
  password) until the next reload.
- **ACL file** (``acl_file``): mosquitto's format. ``topic [read|write|readwrite|deny] <filter>`` lines before
  any ``user`` line apply to anonymous clients, after ``user <name>`` to that user; ``pattern [...] <filter>``
  lines apply to every client, with ``%c`` replaced by its client id and ``%u`` by its username (a pattern with
  ``%u`` never matches a client without one, nor a substitution holding ``+``, ``#`` or ``/``). An access is
  denied if a ``deny`` entry matches, else allowed if an entry grants it, else denied. With no ACL file,
  everything is allowed. A SUBSCRIBE is granted when its filter lies within a filter that grants read (every
  topic it can match, the ACL's filter matches) and within no deny; what it then receives is checked topic by
  topic, so a ``deny`` inside a granted subscription still holds.
- **Reload**: ``Security.reload`` re-reads both files (SIGHUP); a file that fails to load keeps the previous rules,
  with the reason logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import os
import ssl
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from shoalmq.errors import ConfigError, os_error_text

log = logging.getLogger(__name__)

#: CONNACK return codes [MQTT-3.2.2.3].
ACCEPTED, BAD_CREDENTIALS, NOT_AUTHORIZED = 0, 4, 5
READ, WRITE = 1, 2
_ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": 0}
#: Password checks of one client address that may wait for the checking thread at a time.
CHECKS_PER_ADDRESS = 2
#: Remembered results of password checks, until a reload.
CACHE_SIZE = 4096


# -- passwords -------------------------------------------------------------------------------------------

def _b64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


@dataclass(frozen=True)
class PasswordHash:
    kind: str  # "7" (PBKDF2-SHA512) or "6" (SHA-512)
    iterations: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        parts = text.split("$")
        try:
            if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
                iterations = int(parts[2])
                if not 1 <= iterations <= 10_000_000:
                    raise ValueError(f"{iterations} iterations")
                return cls("7", iterations, _b64(parts[3]), _b64(parts[4]))
            if len(parts) == 4 and parts[0] == "" and parts[1] == "6":
                return cls("6", 1, _b64(parts[2]), _b64(parts[3]))
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"unreadable hash ({exc})") from None
        raise ValueError("not a $7$ (PBKDF2-SHA512) or $6$ (SHA-512) hash as mosquitto_passwd writes them")

    def verify(self, password: bytes) -> bool:
        if self.kind == "7":
            computed = hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations, len(self.digest))
        else:
            computed = hashlib.sha512(password + self.salt).digest()
        return hmac.compare_digest(computed, self.digest)


def _read_text(path: Path, setting: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{setting} {path}: {os_error_text(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{setting} {path}: not UTF-8 text") from None


def load_password_file(path: Path) -> dict[str, PasswordHash]:
    """``user -> hash`` from a mosquitto password file; ConfigError if it cannot be read."""
    text = _read_text(path, "password_file")
    users: dict[str, PasswordHash] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            log.error("password_file %s, line %d: expected user:hash; skipped", path, number)
            continue
        try:
            users[user] = PasswordHash.parse(hashed)
        except ValueError as exc:
            log.error("password_file %s, line %d (user %s): %s; skipped", path, number, user, exc)
    return users


# -- ACLs ------------------------------------------------------------------------------------------------

@dataclass
class AclRules:
    anonymous: list[tuple[int, list[str]]] = field(default_factory=list)
    users: dict[str, list[tuple[int, list[str]]]] = field(default_factory=dict)
    #: (access, filter with %c/%u unreplaced)
    patterns: list[tuple[int, str]] = field(default_factory=list)


def load_acl_file(path: Path) -> AclRules:
    """The rules of a mosquitto ACL file; ConfigError (with the line) if it cannot be read or a line is wrong."""
    text = _read_text(path, "acl_file")
    rules = AclRules()
    current = rules.anonymous
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "user":
            if not rest:
                raise ConfigError(f"acl_file {path}, line {number}: 'user' needs a name")
            current = rules.users.setdefault(rest, [])
            continue
        if word not in ("topic", "pattern"):
            raise ConfigError(f"acl_file {path}, line {number}: expected 'topic', 'pattern' or 'user', got {word!r}")
        access_word, _, topic = rest.partition(" ")
        if access_word in _ACCESS:
            access, topic = _ACCESS[access_word], topic.strip()
        else:
            access, topic = READ | WRITE, rest
        if not topic:
            raise ConfigError(f"acl_file {path}, line {number}: {word!r} needs a topic filter")
        try:
            _check_acl_filter(topic.replace("%c", "c").replace("%u", "u"))
        except ValueError as exc:
            raise ConfigError(f"acl_file {path}, line {number}: {exc}") from None
        if word == "pattern":
            rules.patterns.append((access, topic))
        else:
            current.append((access, topic.split("/")))
    return rules


def _check_acl_filter(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            raise ValueError(f"'#' must be the last level of {topic_filter!r}")
        if level not in ("+", "#") and ("+" in level or "#" in level):
            raise ValueError(f"a wildcard must be a whole level in {topic_filter!r}")


def topic_matches(acl: list[str], topic: list[str]) -> bool:
    """Whether an ACL filter matches a topic name (both as levels) [MQTT-4.7]."""
    if topic[0].startswith("$") and acl[0] in ("+", "#"):
        return False
    for i, level in enumerate(acl):
        if level == "#":
            return True
        if i >= len(topic) or (level != "+" and level != topic[i]):
            return False
    return len(acl) == len(topic)


def filter_within(sub: list[str], acl: list[str]) -> bool:
    """Whether every topic the subscription filter ``sub`` can match is matched by the ACL filter ``acl``."""
    if acl[0] in ("+", "#") and sub[0].startswith("$"):
        return False
    for i, level in enumerate(acl):
        if level == "#":
            return True
        if i >= len(sub) or sub[i] == "#":
            return False
        if level != "+" and sub[i] != level:
            return False  # (a '+' in the subscription is within '+' only)
    return len(sub) == len(acl)


# -- the whole -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    client_id: str
    username: str | None


class Security:
    """Authentication and authorization of MQTT clients, from the configuration's files."""

    def __init__(self, password_file: Path | None = None, acl_file: Path | None = None,
                 allow_anonymous: bool | None = None, certificate_identity: bool = False) -> None:
        self.password_file = password_file
        self.acl_file = acl_file
        #: Anonymous clients allowed: as configured, else only when nothing authenticates anyone.
        self.allow_anonymous = allow_anonymous if allow_anonymous is not None else (
            password_file is None and not certificate_identity)
        self.certificate_identity = certificate_identity
        self.users: dict[str, PasswordHash] = {}
        self.acl: AclRules | None = None
        self._cache: OrderedDict[tuple[str, bytes], bool] = OrderedDict()
        self._cache_key = os.urandom(32)
        self._executor: ThreadPoolExecutor | None = None
        self._slots: dict[str, list] = {}
        self._load(initial=True)

    def _load(self, initial: bool) -> None:
        users, acl = self.users, self.acl
        try:
            if self.password_file is not None:
                users = load_password_file(self.password_file)
            if self.acl_file is not None:
                acl = load_acl_file(self.acl_file)
        except ConfigError as exc:
            if initial:
                raise
            log.error("reload: %s; keeping the previous rules", exc)
            return
        self.users, self.acl = users, acl
        self._cache.clear()
        if not initial:
            log.info("reloaded: %s%s", f"{len(users)} user(s) from {self.password_file}" if self.password_file
                     else "no password file", f", ACL from {self.acl_file}" if self.acl_file else "")

    def reload(self) -> None:
        self._load(initial=False)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- authentication --------------------------------------------------------------------------------

    async def authenticate(self, username: str | None, password: bytes | None, address: str,
                           certificate_name: str | None = None) -> tuple[int, str | None]:
        """(CONNACK return code, the username the client acts as). With ``certificate_identity``, a client with a
        verified certificate acts as its common name and no password is checked; one without (on the plain
        listener) goes by the password file and the anonymous rule, as everywhere else."""
        if self.certificate_identity and certificate_name is not None:
            return ACCEPTED, certificate_name
        if username is None:
            return (ACCEPTED if self.allow_anonymous else NOT_AUTHORIZED), None
        if self.password_file is None:
            # No password file: nothing vouches for the username, so the client is anonymous to the ACL (its
            # `user` rules and `%u` patterns never apply to a name anyone can claim), and the anonymous rule
            # decides whether it may connect.
            return (ACCEPTED if self.allow_anonymous else NOT_AUTHORIZED), None
        hashed = self.users.get(username)
        if hashed is None:
            return BAD_CREDENTIALS, None
        secret = password or b""
        key = (username, hmac.new(self._cache_key, secret, hashlib.sha256).digest())
        known = self._cache.get(key)
        if known is None:
            known = await self._check_off_loop(address, lambda: hashed.verify(secret))
            if self.users.get(username) is hashed:  # (not reloaded meanwhile)
                self._cache[key] = known
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return (ACCEPTED, username) if known else (BAD_CREDENTIALS, None)

    async def _check_off_loop(self, address: str, check: Callable[[], bool]) -> bool:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="shoalmq-passwords")
        slot = self._slots.get(address)
        if slot is None:
            slot = self._slots[address] = [asyncio.Semaphore(CHECKS_PER_ADDRESS), 0]
        slot[1] += 1
        try:
            async with slot[0]:
                return await asyncio.get_running_loop().run_in_executor(self._executor, check)
        finally:
            slot[1] -= 1
            if not slot[1]:
                del self._slots[address]

    # -- authorization ---------------------------------------------------------------------------------

    def _entries(self, who: Identity) -> list[tuple[int, list[str]]]:
        acl = self.acl
        assert acl is not None
        entries = list(acl.anonymous if who.username is None else acl.users.get(who.username, ()))
        for access, pattern in acl.patterns:
            if "%u" in pattern and (who.username is None or any(c in who.username for c in "+#/")):
                continue
            if "%c" in pattern and any(c in who.client_id for c in "+#/"):
                continue
            text = pattern.replace("%c", who.client_id)
            if who.username is not None:
                text = text.replace("%u", who.username)
            entries.append((access, text.split("/")))
        return entries

    def may(self, who: Identity, topic: str, access: int) -> bool:
        """Whether ``who`` may read (receive) or write (publish) ``topic``."""
        return self._decide(who, topic, access, topic_matches)

    def may_subscribe(self, who: Identity, topic_filter: str) -> bool:
        """Whether ``who`` may subscribe to ``topic_filter``: it lies within a filter granting read, and within
        no deny."""
        return self._decide(who, topic_filter, READ, lambda acl, levels: filter_within(levels, acl))

    def _decide(self, who: Identity, topic: str, access: int,
                matches: Callable[[list[str], list[str]], bool]) -> bool:
        if self.acl is None:
            return True
        levels = topic.split("/")
        entries = self._entries(who)
        if any(granted == 0 and matches(acl, levels) for granted, acl in entries):
            return False
        return any(granted & access and matches(acl, levels) for granted, acl in entries)


# -- TLS -------------------------------------------------------------------------------------------------

def server_context(certfile: Path, keyfile: Path, cafile: Path | None, require_certificate: bool) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, the node's certificate, and (``require_certificate``) client
    certificates signed by ``cafile``. ConfigError if a file cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_certificates(context, certfile, keyfile, cafile)
    context.verify_mode = ssl.CERT_REQUIRED if require_certificate else ssl.CERT_NONE
    return context


def load_certificates(context: ssl.SSLContext, certfile: Path, keyfile: Path, cafile: Path | None) -> None:
    """(Re)load a context's certificate, key and CA; new handshakes use them, open connections are untouched."""
    try:
        context.load_cert_chain(str(certfile), str(keyfile))
        if cafile is not None:
            context.load_verify_locations(cafile=str(cafile))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS: cannot load {certfile} / {keyfile}"
                          f"{f' / {cafile}' if cafile else ''}: {exc}") from None


def certificate_name(ssl_object: ssl.SSLObject | None) -> str | None:
    """The common name of a verified peer certificate, or None."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
