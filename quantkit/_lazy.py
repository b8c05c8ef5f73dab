"""Lazy package exports: a package names what it exports and from which submodule, and the
submodule is imported on first use of a name (so `import quantkit.<pkg>` stays cheap)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: ``name`` comes from ``package.<exports[name]>``."""

    def __getattr__(name: str) -> Any:
        mod = exports.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{mod}", package), name)

    return __getattr__
