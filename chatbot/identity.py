"""Who a reply or a thumb is from: the rater, decided by one rule for the
chat page, the API and the thumbs rate limit.

The rule, first that applies:

1. a **login** (the chat page's, or HTTP Basic on ``/v1``) or an **API
   key**'s user: proven, so the body's ``user`` field is only kept beside it;
2. the browser **session** (the chat page without logins);
3. what an API client **claims** in the body's ``user`` field;
4. the client's **address** (an API client that says nothing).

Without logins or keys, 3 and 4 are all there is: per-rater bounds (each
rater's bounded share of the training data, the thumbs rate limit) then
count what clients claim. The store records a rater as a user name (1 and 3) or a
session id (2, and ``address:<host>`` for 4); ``Identity.columns`` says
which, with what the client claimed and how the rater was known.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from chatbot.credentials import Credentials, Verified
from chatbot.errors import ApiError

API_SESSION = "api"  # the session column of rows written through the API by a named rater
HOW = ("login", "api_key", "session", "claimed", "address")
_NAMED = ("login", "api_key", "claimed")  # a user name, not a session


@dataclass(frozen=True)
class Identity:
    who: str  # the rater: a user name, a browser session id, or "address:<host>"
    how: str  # one of HOW
    origin: str = API_SESSION  # the browser session the request came from, or "api"
    claimed: str | None = None  # the body's `user`, as sent; the rater only when how == "claimed"

    @property
    def user(self) -> str | None:
        """The store's ``user`` column: the rater's name when it has one."""
        return self.who if self.how in _NAMED else None

    @property
    def session_id(self) -> str:
        """The store's ``session_id`` column: where it came from, or the rater
        itself when the rater is a session or an address."""
        return self.origin if self.how in _NAMED else self.who

    @property
    def key(self) -> str:
        """One string per rater, as the training data counts raters (user, else session)."""
        return f"user:{self.user}" if self.user is not None else f"session:{self.session_id}"

    def columns(self) -> dict:
        """Keyword arguments of `Store.log_response` and `Store.record_feedback`."""
        return {"session_id": self.session_id, "user": self.user, "claimed_user": self.claimed,
                "identified_by": self.how}


def identify(*, verified: Verified | None = None, browser_session: str | None = None,
             claimed: str | None = None, address: str | None = None) -> Identity:
    """The rule of this module's docstring."""
    origin = browser_session or API_SESSION
    if verified is not None:
        return Identity(verified.user, verified.how, origin, claimed)
    if browser_session:
        return Identity(browser_session, "session", origin, claimed)
    if claimed and claimed.strip():
        return Identity(claimed, "claimed", origin, claimed)
    return Identity(f"address:{address or 'unknown'}", "address", origin, claimed)


@dataclass(frozen=True)
class Caller:
    """What a ``/v1`` request proved (nothing when the server asks for no
    credentials) and where it came from; the body adds what it claims."""

    verified: Verified | None
    address: str | None

    def identity(self, claimed: str | None = None) -> Identity:
        return identify(verified=self.verified, claimed=claimed, address=self.address)


def api_caller(credentials: Credentials | None):
    """A FastAPI dependency of the ``/v1`` routes: the `Caller`, or a 401 in
    OpenAI's shape when the server has logins or keys and the request does
    not carry one of them. Without any, the ``Authorization`` header is not
    read (OpenAI clients send a placeholder key)."""
    credentials = credentials or Credentials()

    def caller(request: Request) -> Caller:
        address = request.client.host if request.client else None
        if not credentials.required:
            return Caller(None, address)
        given = request.headers.get("authorization")
        verified = credentials.verify(given)
        if verified is None:
            ways = " or ".join((["an API key as Authorization: Bearer <key>"] if credentials.keys else []) +
                               (["a login as HTTP Basic"] if credentials.logins else []))
            message = ("the credentials given do not match" if given else "this server needs credentials") + \
                f": send {ways}"
            raise ApiError(401, message, code="invalid_api_key" if given else "missing_credentials",
                           headers={"WWW-Authenticate": credentials.challenge()})
        return Caller(verified, address)

    return caller
