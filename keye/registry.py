"""Named plug-in tables: rewards, policy losses, eval formats, world shapes register themselves by name.

``register_reward = registrar(REWARDS)`` gives the decorator ``@register_reward("accuracy")``, which files
the function under its name and returns it unchanged, so a new entry is one decorated function, never an
edit to an if-chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def registrar(table: dict[str, T]) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory filing functions in ``table``; registering a taken name is an error."""

    def register(name: str) -> Callable[[T], T]:
        def wrap(fn: T) -> T:
            if name in table:
                raise ValueError(f"{name!r} is already registered ({table[name]!r}); pick another name")
            table[name] = fn
            return fn

        return wrap

    return register
