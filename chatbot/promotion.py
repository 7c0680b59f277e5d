"""Making a version active, checked first: the one path that promote and
rollback take from the operator API, the console and the command line.

The version's adapter must pass the check of `chatbot.adapters` before the
activation is recorded; one that fails is refused (`AdapterLoadError`, the
HTTP API's 409) and the active version does not change. Where the check runs
decides what it is checked against: a serving process checks against the
model it serves (`Policy.check_adapter`); the command line, which has no
model loaded and should not load one (minutes, and a GPU's memory, for a
large base), checks the files against the config of the base the adapter
was trained on (`on_disk`), which gives the same shapes. A server following
the registry checks again before it swaps, so a version promoted by a
process that could not see its files break still never serves.
"""

from __future__ import annotations

import os
from typing import Callable

from chatbot.adapters import AdapterLoadError, check_on_disk
from storage import Store

# (version, its adapters row) -> None, or raises AdapterLoadError
Check = Callable[[str, dict], None]


def promote(store: Store, version: str, check: Check, *, actor: str, reason: str | None = None,
            action: str = "promote", evidence: dict | None = None) -> dict:
    """`Store.promote`, once `version` passed `check`."""
    _check(store, version, check)
    return store.promote(version, action=action, actor=actor, reason=reason, evidence=evidence)


def rollback(store: Store, to: str | None, check: Check, *, actor: str, reason: str | None = None,
             evidence: dict | None = None) -> dict:
    """`Store.rollback`, once the version it goes back to passed `check`."""
    target = store.rollback_target(to)
    _check(store, target, check)
    return store.rollback(target, actor=actor, reason=reason, evidence=evidence)


def on_disk(data_dir: str | os.PathLike) -> Check:
    """The check where no model is loaded: each adapter against its own base's config."""
    def check(version: str, row: dict) -> None:
        check_on_disk(version, row["path"], base_model=row.get("base_model"), data_dir=data_dir)

    return check


def _check(store: Store, version: str, check: Check) -> None:
    row = store.get_adapter(version)
    if row is None:  # v0, or a name the store refuses with a message of its own
        return
    try:
        check(version, row)
    except AdapterLoadError as exc:
        raise type(exc)(f"{exc}; {store.active_version()} stays active") from None
