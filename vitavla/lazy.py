"""Package namespaces that import their members on first use.

Simulator worker processes unpickle an env class from ``vitavla.rollout`` or read a normalizer from
``datamodules``; importing those packages eagerly pulled in Lightning (6-9 s per worker start). A package
lists ``name -> module`` and gets ``__getattr__``/``__dir__`` from :func:`lazy_exports` (PEP 562), so
``from datamodules import LiberoDataModule`` and jsonargparse's ``class_path`` lookups work unchanged.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public names live in the modules ``exports`` names."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
