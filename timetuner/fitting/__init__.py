"""Fitting a table: the method (objectives and strategies), the 1-D and Adam searches, the learned grid, `auto`,
the run (settings, checkpoints, the ending) and its cost plan."""

from timetuner.exports import facade

__all__, __getattr__ = facade(__name__, {
    "EVAL_SEED_OFFSET": "timetuner.fitting.config",
    "FitConfig": "timetuner.fitting.config",
    "fit": "timetuner.fitting.api",
    "plan": "timetuner.fitting.api",
})
