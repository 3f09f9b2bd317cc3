"""The one exception type for user mistakes; the CLI prints it as one line and exits 2."""

from __future__ import annotations


class UserError(ValueError):
    """A bad argument, path or file supplied by the user; the message names it and what is accepted."""


def check_choice(name: str, value: str, accepted) -> str:
    """Return `value` if it is one of `accepted`, else raise a UserError naming both."""
    if value not in accepted:
        raise UserError(f"{name} {value!r} is not known; accepted: {', '.join(sorted(accepted))}")
    return value
