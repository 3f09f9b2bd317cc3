"""timetuner: timestep tuning for few-step diffusion sampling, and a training companion.

    from timetuner import TunedScheduler, TauTable, fit
"""

from __future__ import annotations

__version__ = "0.1.0"

from timetuner.errors import UserError  # noqa: E402

# The function shadows the submodule as an attribute; reach the module with importlib.import_module("timetuner.fit").
from timetuner.fit import fit  # noqa: E402

# Imported eagerly on purpose: pipelines saved with a TunedScheduler name `timetuner.scheduler` in
# model_index.json, and diffusers loads such a component only from a module already in sys.modules, so
# `import timetuner` must be enough. (A lazy module proved fragile: torch touches sys.modules while importing.)
from timetuner.scheduler import TunedScheduler  # noqa: E402
from timetuner.table import TauTable  # noqa: E402

__all__ = ["TauTable", "TunedScheduler", "UserError", "__version__", "fit"]
