"""The backbone registry and the two message helpers its builders share.

Apart from the package face (`backbones/__init__.py`) so that the builder modules can register
into BACKBONES without importing the package that imports them.
"""
from __future__ import annotations

from transfer_cli.backbones.model import TransferModel
from transfer_cli.registry import Registry

BACKBONES: Registry[TransferModel] = Registry("backbone")


def few(names: list[str]) -> str:
    """The first few names of a list, for a one-line message."""
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def first_line(error: BaseException) -> str:
    """A library error's first line, to quote inside our own one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
