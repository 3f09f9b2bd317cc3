"""timetuner: timestep tuning for few-step diffusion sampling, and a training companion.

    from timetuner import TunedScheduler, TauTable, fit

`import timetuner` loads the table and the scheduler only — what a pipeline saved with a `TunedScheduler` needs
(`model_index.json` names `timetuner.scheduler`, and diffusers loads such a component only from a module already
in sys.modules). Fitting (`timetuner.fitting`, the method in `timetuner.fitting.method`), measurement, the trainers and
the CLI load when first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from timetuner.errors import UserError  # noqa: E402
from timetuner.scheduler import TunedScheduler  # noqa: E402
from timetuner.table import TauTable, is_flow  # noqa: E402


def fit(model: str | None = None, out=None, **options):
    """Fit a τ table for `model` (default: the embedded digits model); see `timetuner.fitting.api.fit`."""
    from timetuner.fitting.api import fit as run

    return run(model, out, **options)


def plan(model: str | None = None, **options) -> list[str]:
    """What a fit of `model` would compute and cost, before any of it; see `timetuner.fitting.api.plan`."""
    from timetuner.fitting.api import plan as lines

    return lines(model, **options)


__all__ = ["TauTable", "TunedScheduler", "UserError", "__version__", "fit", "is_flow", "plan"]
