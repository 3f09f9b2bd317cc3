"""The one distance between samples: per sample, the RMS over every value of the difference to a reference.

The x0 gap of every verdict (`timetuner.measuring.verdict.judge`), the per-state gaps of a trajectory
(`timetuner.measuring.metrics.truncation_gap`), the e2e objective and the learned grid's loss
(`timetuner.fitting.method.sample_distance`) and `auto`'s ranking all measure with it.
"""

from __future__ import annotations

import torch


def rms_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """√(mean over all but the first dimension of (a − b)² + eps), one value per sample; `eps` > 0 keeps the
    gradient finite where a = b."""
    return (a - b).pow(2).flatten(1).mean(1).add(eps).sqrt()
