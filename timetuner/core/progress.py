"""Progress bars that count network evaluations as the network makes them (every call of a `Denoiser` inside the
block advances the bar): a fit's steps (`timetuner.fitting.steps.bars`) and the evaluation's samples."""

from __future__ import annotations

import contextlib


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
