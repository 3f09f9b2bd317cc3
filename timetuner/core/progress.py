"""Progress bars that count network evaluations as the network makes them (every call of a `Denoiser` inside the
block advances the bar); `bar` takes the phases of a fit's plan (`timetuner.fitting.cost.plan`)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def bar(denoiser, phases: list | None, key: str, show: bool):
    """A progress bar over the evaluations of the phases named `key`, advanced by every network call inside the
    block (none without `phases`, or when they are cached)."""
    mine = [p for p in phases or [] if p.key == key and not p.cached]
    if not mine:
        yield
        return
    with counting(denoiser, sum(p.evaluations for p in mine), " and ".join(p.name for p in mine), show):
        yield


@contextlib.contextmanager
def counting(denoiser, total: int, desc: str, show: bool):
    """A progress bar of `total` network evaluations, advanced by every call of `denoiser` inside the block (where
    part of the work is found in the cache, the bar ends early)."""
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc=desc, unit="eval", unit_scale=True, leave=False, disable=not show,
                    dynamic_ncols=True)
    with denoiser.watch(progress.update):
        yield
    progress.close()
