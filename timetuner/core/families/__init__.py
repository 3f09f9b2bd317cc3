"""The model families `Denoiser` adapts (`timetuner.core.denoiser`), one module each in this folder, found by the
network's class (or a diffusers base class): `family_of(network)`.

Every family is a `Family` subclass (`base.py`: what is asked of a family, with defaults) that overrides how its
network is called and guided, how its pipeline embeds prompts, its state's shape and what it refuses. Adding one is
a module here with a subclass naming its `networks`, and its test (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from timetuner.core.families.base import Family, call_default, network_of
from timetuner.errors import UserError


def _discovered() -> dict[str, type[Family]]:
    """{network class name: family} over every module of this folder."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    found, todo = {}, list(Family.__subclasses__())
    while todo:
        family = todo.pop()
        todo += family.__subclasses__()
        found.update({name: family for name in family.networks})
    return dict(sorted(found.items()))


FAMILIES: dict[str, type[Family]] = _discovered()


def family_of(model) -> type[Family]:
    """The family of a network, by its class (or a diffusers base class) and then its config; UserError if
    unsupported."""
    name = type(model).__name__
    family = FAMILIES.get(name)
    if family is None:  # subclasses (wrappers, patched models) adapt like their diffusers base
        family = next((FAMILIES[c.__name__] for c in type(model).__mro__ if c.__name__ in FAMILIES), None)
    if family is None:
        raise UserError(f"network {name} is not supported; accepted: {', '.join(FAMILIES)}")
    return family.resolve(model)


__all__ = ["FAMILIES", "Family", "call_default", "family_of", "network_of"]
