"""The logins and API keys the operator configured, and checking a secret against them.

``--auth user:pass[,user:pass]`` and ``--auth-file FILE`` (one ``user:pass``
a line) are logins: the chat page asks for one, and ``/v1`` takes one as
HTTP Basic. ``--api-keys-file FILE`` (one ``user:key`` a line) holds keys
for OpenAI clients, sent as ``Authorization: Bearer <key>``. In both files
blank lines and lines starting with ``#`` are skipped.

Secrets are compared in constant time against every entry, and never
appear in a message: a malformed entry is named by its line number.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

MIN_KEY_CHARS = 16


class CredentialsError(ValueError):
    """A configuration of logins or keys that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Verified:
    """A caller whose secret matched: the user it belongs to, and what it was."""

    user: str
    how: str  # "login" (a user name and password) or "api_key"


@dataclass(frozen=True)
class Credentials:
    logins: tuple[tuple[str, str], ...] = ()  # (user, password)
    keys: tuple[tuple[str, str], ...] = ()  # (user, key)

    @property
    def required(self) -> bool:
        """Whether ``/v1`` asks for credentials: with any login or key configured."""
        return bool(self.logins or self.keys)

    def check_login(self, user: str, password: str) -> bool:
        """A user name and password that match one login (the chat page's check too)."""
        matched = False
        for known_user, known_password in self.logins:
            # Every entry is compared, so the time taken says nothing about which matched.
            matched |= _same(user, known_user) & _same(password, known_password)
        return matched

    def key_user(self, key: str) -> str | None:
        """The user an API key belongs to, or None."""
        found = None
        for user, known_key in self.keys:
            if _same(key, known_key):
                found = user
        return found

    def verify(self, authorization: str | None) -> Verified | None:
        """The caller an ``Authorization`` header proves, or None (missing or wrong)."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            user = self.key_user(value)
            return Verified(user, "api_key") if user is not None else None
        if scheme.lower() == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            user, sep, password = decoded.partition(":")
            if sep and self.check_login(user, password):
                return Verified(user, "login")
        return None

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401: the schemes this server takes."""
        schemes = (['Bearer realm="learning-chatbot"'] if self.keys else []) + \
                  (['Basic realm="learning-chatbot", charset="UTF-8"'] if self.logins else [])
        return ", ".join(schemes)


def _same(given: str, known: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), known.encode("utf-8"))


def _entries(lines: list[str], where: str, what: str = "line"):
    """(where it is, user, secret) of every line that is not blank or a comment."""
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, secret = line.partition(":")
        user, secret = user.strip(), secret.strip()
        if not sep or not user or not secret:
            raise CredentialsError(f"{where} {what} {number}: expected user:secret")
        yield f"{where} {what} {number}", user, secret


def _read(path: str, flag: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fp:
            return fp.read().splitlines()
    except OSError as exc:
        raise CredentialsError(f"cannot read {flag} {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"{flag} {path!r} is not UTF-8 text") from None


def load(auth: str | None = None, auth_file: str | None = None, api_keys_file: str | None = None) -> Credentials:
    """Credentials from the command line's ``--auth``, ``--auth-file`` and
    ``--api-keys-file``; `CredentialsError` for anything malformed."""
    entries = [e for e in (auth or "").split(",") if e.strip()]
    logins = [(user, password) for _, user, password in _entries(entries, "--auth", "entry")]
    if auth_file:
        lines = _read(auth_file, "--auth-file")
        logins += [(user, password) for _, user, password in _entries(lines, f"--auth-file {auth_file}")]
    keys, seen = [], {}
    if api_keys_file:
        for where, user, key in _entries(_read(api_keys_file, "--api-keys-file"), f"--api-keys-file {api_keys_file}"):
            if len(key) < MIN_KEY_CHARS:
                raise CredentialsError(f"{where}: a key must be at least {MIN_KEY_CHARS} characters "
                                       "(for example: python -c 'import secrets; print(secrets.token_urlsafe(24))')")
            if key in seen:
                raise CredentialsError(f"{where}: the same key as {seen[key]}; each key belongs to one user")
            seen[key] = where
            keys.append((user, key))
    return Credentials(tuple(logins), tuple(keys))
