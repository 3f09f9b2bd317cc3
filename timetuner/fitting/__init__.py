"""Fitting a table: the method (objectives and strategies), the 1-D and Adam searches, the learned grid, `auto`,
the run (settings, checkpoints, the ending) and its cost plan."""
