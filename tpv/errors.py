"""The one error hierarchy of tpv: every error raised on purpose is a `TpvError` of one category.

Callers map errors BY TYPE, never by message text: the CLI turns a category into an exit code (`exit_code`), the
server into an HTTP status (serve.errors). Module errors (StoreConflict, UnknownTaskError, ...) subclass one
category, and the built-in base they used to have (ValueError, LookupError) so existing `except` clauses hold.
"""

from __future__ import annotations


class TpvError(Exception):
    """Base of every error tpv raises on purpose."""


class InvalidInput(TpvError, ValueError):
    """The caller's input (a config, a spec, a tensor, a name) is not acceptable."""


class NotFoundError(TpvError, LookupError):
    """A named thing (task, vector, composition, backbone) does not exist."""


class ConflictError(TpvError):
    """The request is valid but clashes with what is stored (an id taken by other content, a different origin)."""


class CorruptData(TpvError):
    """Stored data fails its checks (hash, schema): the server's fault, never the caller's."""


class Unavailable(TpvError):
    """Something the request needs is not prepared here (data not fetched, a model not on disk)."""


class Interrupted(TpvError):
    """The user stopped a long job (Ctrl-C) before it finished; what it saved lets the same command resume it."""


#: CLI exit codes by category (130 = 128 + SIGINT, the shell's code for Ctrl-C); 1 stays for unexpected failures
EXIT_CODES: dict[type[TpvError], int] = {
    InvalidInput: 2, NotFoundError: 3, ConflictError: 4, CorruptData: 5, Unavailable: 6, Interrupted: 130,
    TpvError: 1,
}


def category(exc: BaseException) -> type[TpvError] | None:
    """The most specific category an error belongs to, walking its MRO (None for errors that are not tpv's)."""
    for klass in type(exc).__mro__:
        if klass in EXIT_CODES:
            return klass
    return None


def exit_code(exc: BaseException) -> int:
    klass = category(exc)
    return EXIT_CODES[klass] if klass is not None else 1
