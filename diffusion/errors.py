"""Errors that mean "your input is wrong, and here is how to fix it"; the CLIs print them plainly."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's config, data, paths or flags; the message names it and the fix."""


def exit_on_user_error(main):
    """Wrap a CLI entry point: a UserError prints `error: <message>` and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapper
