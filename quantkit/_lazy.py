"""Lazy package exports: a package names its public names by submodule, and a submodule is imported
on first use of one of its names (so `import quantkit.<pkg>` stays cheap)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, by_module: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``: each name of ``by_module[mod]`` comes from ``package.mod``."""
    where = {name: mod for mod, names in by_module.items() for name in names}

    def __getattr__(name: str) -> Any:
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{mod}", package), name)

    return __getattr__, sorted(where)
