"""Lazy package facades: a package's public names, each loaded from its module on first use.

`timetuner.core`, `timetuner.fitting` and `timetuner.measuring` name what scripts and notebooks may import from them
(the benchmarks under bench/ use nothing else); a name loads its module only when first asked for, so importing one
package never loads the others (diffusers loads `timetuner.scheduler` through `import timetuner`).
"""

from __future__ import annotations

import importlib


def facade(package: str, exports: dict[str, str]):
    """(`__all__`, `__getattr__`) of `package`, whose public names are `exports` = {name: module}."""

    def attribute(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return sorted(exports), attribute
