"""Name -> factory registries, so configs pick implementations by name (as timm's model registry does)."""
from __future__ import annotations

import inspect
from typing import Callable, Generic, TypeVar

from transfer_cli.errors import TransferCliError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from a config name to the class or function that builds it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = factory
            return factory

        return add

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise TransferCliError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def summary(self, name: str) -> str:
        """The first paragraph of the factory's docstring, on one line: what `transfer-cli list` prints, so
        the description lives beside the code it describes."""
        doc = inspect.getdoc(self.get(name)) or ""
        return " ".join(doc.split("\n\n")[0].split())
