"""The one exception type for mistakes a person can fix (bad config, bad data, diverged training).

The CLI prints its message as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""
import sys
from typing import NoReturn


class TransferCliError(Exception):
    """A configuration or input problem, with a message that says what is wrong and how to fix it."""


def fail(message: str) -> NoReturn:
    """End the command the way every TransferCliError ends it: one line on stderr, exit status 2."""
    print(f"transfer-cli: error: {message}", file=sys.stderr)
    raise SystemExit(2)
