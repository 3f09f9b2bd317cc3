"""Sample-quality metrics: Fréchet distance through clean-fid over a feature extractor's features."""

from __future__ import annotations

import numpy as np
import torch

from timetuner.errors import UserError


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of an N×D feature matrix, as clean-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise UserError(f"Fréchet distance needs at least 2 feature rows; got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between two feature sets (Heusel et al., 2017), computed by clean-fid."""
    from cleanfid.fid import frechet_distance as clean_fid_frechet

    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    return float(clean_fid_frechet(mu_a, sigma_a, mu_b, sigma_b))


@torch.no_grad()
def digits_features(images: torch.Tensor, extractor=None, batch_size: int = 1024) -> np.ndarray:
    """Features of N×1×H×W images in [-1, 1] under the digits feature extractor (shipped by default)."""
    from timetuner.features import load_digits_features

    net = extractor if extractor is not None else load_digits_features()
    feats = [net.features(chunk.float().cpu()) for chunk in images.split(batch_size)]
    return torch.cat(feats).numpy()


def digits_fd(images: torch.Tensor, reference: str = "test", extractor=None) -> float:
    """FD of images against a digits split ("test": held out, "train") in digits-feature space."""
    from timetuner.trainers.data import load_digits_tensor

    ref = load_digits_tensor(reference)[0]
    return frechet_distance(digits_features(images, extractor), digits_features(ref, extractor))


@torch.no_grad()
def truncation_gap(sampler, noise: torch.Tensor, reference_states: list[torch.Tensor], taus=None) -> dict:
    """Per-state and final RMS distance (VP space) of a few-step rollout to the reference trajectory (paper Fig. 2).

    `reference_states` from `timetuner.reference.reference_trajectory` for the same sampler and noise; `taus`
    the network timesteps (None: plain). Returns {"times", "per_state": [mean RMS per state], "x0": RMS of the
    clamped final samples, "final": the final states}.
    """
    from timetuner.reference import state_times, to_vp

    _, states = sampler.rollout(noise, None if taus is None else torch.as_tensor(taus), keep_states=True)
    times = state_times(sampler)
    per_state = []
    for x, ref, t in zip(states, reference_states, times, strict=True):
        diff = to_vp(sampler, x, t) - to_vp(sampler, ref, t)
        per_state.append(float(diff.pow(2).mean(dim=tuple(range(1, diff.ndim))).sqrt().mean()))
    # The x0 figure compares what a user sees: final samples clamped to the data range [-1, 1].
    x0 = (states[-1].clamp(-1, 1) - reference_states[-1].clamp(-1, 1)).pow(2)
    x0 = float(x0.mean(dim=tuple(range(1, x0.ndim))).sqrt().mean())
    return {"times": times, "per_state": per_state, "x0": x0, "final": states[-1]}
