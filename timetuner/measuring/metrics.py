"""Sample-quality metrics: Fréchet distance through clean-fid, truncation gaps, paired bootstrap intervals."""

from __future__ import annotations

import numpy as np
import torch

from timetuner.core.data import load_digits_tensor
from timetuner.core.distance import rms_distance
from timetuner.errors import UserError
from timetuner.measuring.features import load_digits_features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of an N×D feature matrix, as clean-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise UserError(f"Fréchet distance needs at least 2 feature rows; got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


class _SqrtmWithDisp:
    """scipy.linalg as clean-fid 0.1.35 calls it: `sqrtm(A, disp=False)` returning (root, error estimate).

    SciPy 1.18 removed `disp` (deprecated in 1.16), so clean-fid's `frechet_distance` raises a TypeError there.
    This view restores the old call and forwards everything else to scipy.linalg unchanged.
    """

    def __init__(self, linalg):
        self._linalg = linalg

    def __getattr__(self, name):
        return getattr(self._linalg, name)

    def sqrtm(self, a, disp=True, **kwargs):
        root = self._linalg.sqrtm(a, **kwargs)
        if disp:
            return root
        error = np.linalg.norm(root @ root - a, "fro") ** 2 / max(np.linalg.norm(a, "fro"), np.finfo(float).tiny)
        return root, error


def _clean_fid_frechet():
    """clean-fid's `frechet_distance`, made to run on SciPy versions without `sqrtm(..., disp=...)`."""
    import inspect

    from cleanfid import fid

    linalg = fid.linalg
    if not isinstance(linalg, _SqrtmWithDisp) and "disp" not in inspect.signature(linalg.sqrtm).parameters:
        fid.linalg = _SqrtmWithDisp(linalg)
    return fid.frechet_distance


def frechet_distance(features_a: np.ndarray, features_b) -> float:
    """Fréchet distance between two feature sets (Heusel et al., 2017), computed by clean-fid.

    `features_b` may also be precomputed statistics (mu, sigma), e.g. of a reference set.
    """
    clean_fid_frechet = _clean_fid_frechet()
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = features_b if isinstance(features_b, tuple) else feature_statistics(features_b)
    if mu_a.shape != np.shape(mu_b):
        raise UserError(f"features of dimension {mu_a.shape[0]} cannot be compared with reference statistics of "
                        f"dimension {np.shape(mu_b)[0]}; accepted: the same feature extractor on both sides")
    return float(clean_fid_frechet(mu_a, sigma_a, mu_b, sigma_b))


def kernel_distance(features_a: np.ndarray, features_b: np.ndarray, seed: int = 0, subsets: int = 100,
                    max_subset: int = 1000, cache: dict | None = None) -> float:
    """Kernel (Inception) distance, KID (Bińkowski et al., 2018): clean-fid's estimator on clean-fid's subsets.

    clean-fid's `kernel_distance(a, b)` averages, over `subsets` draws of m = min(|a|, |b|, max_subset) rows of
    each side (NumPy's global generator, here seeded by `seed`), the unbiased MMD² of the cubic polynomial kernel.
    Its sums are computed here from whole-set kernel sums where a draw takes every row of `a` (the usual case: n
    samples against a larger reference set), and the reference's own terms — the same for every sampler judged
    against it — are kept in `cache` (one dict per reference set, e.g. the `Yardstick`'s): the same figure (to
    rounding, tested against clean-fid) in a fraction of the time. NumPy's global generator is left untouched.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if min(a.shape[0], b.shape[0]) < 2:
        raise UserError(f"kernel distance needs at least 2 feature rows on each side; got {a.shape}, {b.shape}")
    d, m = a.shape[1], min(a.shape[0], b.shape[0], max_subset)
    rng = np.random.RandomState(seed)  # the generator np.random.seed(seed) gives clean-fid's np.random.choice
    draws = [(rng.choice(b.shape[0], m, replace=False), rng.choice(a.shape[0], m, replace=False))
             for _ in range(subsets)]

    def kernel(x, y):  # (x·y/d + 1)³, in place
        k = x @ y.T
        k /= d
        k += 1
        return k * k * k

    def off_diagonal(x):
        k = kernel(x, x)
        return k.sum() - np.trace(k)

    key = ("kid", seed, subsets, m, a.shape[0], b.shape[0])
    own_b = cache.get(key) if cache is not None else None
    if own_b is None:
        own_b = [off_diagonal(b[ix]) for ix, _ in draws]
        if cache is not None:
            cache[key] = own_b
    whole = m == a.shape[0]  # every draw takes all of a (in some order): a's sums are the same in every draw
    own_a = off_diagonal(a) if whole else None
    # Σ_j k(b_i, a_j) for every reference row i, in blocks of 2000 rows (memory: 2000 × |a| at a time)
    cross = np.concatenate([kernel(block, a).sum(1) for block in np.array_split(b, -(-b.shape[0] // 2000))]) \
        if whole else None
    total = 0.0
    for (ix, iy), bb in zip(draws, own_b, strict=True):
        aa = own_a if whole else off_diagonal(a[iy])
        ab = cross[ix].sum() if whole else kernel(b[ix], a[iy]).sum()
        total += (aa + bb) / (m - 1) - ab * 2 / m
    return float(total / subsets / m)


@torch.no_grad()
def digits_features(images: torch.Tensor, extractor=None, batch_size: int = 1024) -> np.ndarray:
    """Features of N×1×H×W images in [-1, 1] under the digits feature extractor (shipped by default)."""
    net = extractor if extractor is not None else load_digits_features()
    feats = [net.features(chunk.float().cpu()) for chunk in images.split(batch_size)]
    return torch.cat(feats).numpy()


def digits_fd(images: torch.Tensor, reference: str = "test", extractor=None) -> float:
    """FD of images against a digits split ("test": held out, "train") in digits-feature space."""
    ref = load_digits_tensor(reference)[0]
    return frechet_distance(digits_features(images, extractor), digits_features(ref, extractor))


@torch.no_grad()
def truncation_gap(solver, noise: torch.Tensor, reference_states: list[torch.Tensor], taus=None,
                   clamp: bool = True, coefficients=None) -> dict:
    """Per-state and final RMS distance (VP space) of a few-step rollout to the reference trajectory (paper Fig. 2).

    `reference_states` from `timetuner.core.reference.reference_trajectory` for the same solver and noise; `taus`
    the network timesteps (None: plain), `coefficients` a table's learned ones (None: none). Returns {"times",
    "per_state": [mean RMS per state], "x0": RMS of the final samples (clamped to [-1, 1] unless `clamp` is False:
    latents have no such range), "x0_per_sample": that RMS per sample, "final": the final states}.
    """
    _, states = solver.rollout(noise, None if taus is None else torch.as_tensor(taus), keep_states=True,
                               coefficients=coefficients)
    times = solver.state_times()
    per_state = []
    for x, ref, t in zip(states, reference_states, times, strict=True):
        per_state.append(float(rms_distance(solver.to_vp(x, t), solver.to_vp(ref, t)).mean()))
    # The x0 figure compares what a user sees: final samples clamped to the data range [-1, 1].
    final, target = states[-1], reference_states[-1]
    x0_per_sample = rms_distance(final.clamp(-1, 1), target.clamp(-1, 1)) if clamp else rms_distance(final, target)
    return {"times": times, "per_state": per_state, "x0": float(x0_per_sample.mean()),
            "x0_per_sample": x0_per_sample.cpu(), "final": states[-1]}


def paired_bootstrap(plain, tuned, statistic=None, resamples: int = 1000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Change statistic(tuned) − statistic(plain) with a paired percentile-bootstrap interval over samples.

    `plain[i]` and `tuned[i]` come from the same noise i (rows of arrays, or feature rows); each resample draws
    the same indices for both, so the noise shared by the pair cancels. `statistic` maps rows to a number
    (default: the mean). Returns {"plain", "tuned", "change", "low", "high", "level", "significant"};
    `significant` is False when the interval covers 0.
    """
    plain, tuned = np.asarray(plain, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if plain.shape != tuned.shape or plain.shape[0] < 2:
        raise UserError(f"a paired bootstrap needs two equal-length sets of >= 2 samples; got {plain.shape} and "
                        f"{tuned.shape}")
    if not 0 < level < 1 or resamples < 1:
        raise UserError(f"bootstrap level {level} / resamples {resamples}: accepted: 0 < level < 1, resamples >= 1")
    stat = statistic or (lambda rows: float(np.mean(rows)))
    rng = np.random.default_rng(seed)
    n = plain.shape[0]
    changes = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        changes[i] = stat(tuned[idx]) - stat(plain[idx])
    low, high = np.quantile(changes, [(1 - level) / 2, 1 - (1 - level) / 2])
    a, b = stat(plain), stat(tuned)
    return {"plain": a, "tuned": b, "change": b - a, "low": float(low), "high": float(high), "level": level,
            "significant": not (low <= 0.0 <= high)}


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of independent values (seeds): mean ± t_{n−1} · sd / √n.

    With a handful of seeds this is the honest interval; a percentile bootstrap over 3 seeds returns their range
    (each resample is the minimum with probability 1/27 > 2.5 %), whatever the level."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise UserError(f"an interval over seeds needs >= 2 values; got {v.size}")
    half = float(stats.t.ppf(1 - (1 - level) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return float(v.mean() - half), float(v.mean() + half)


def describe_change(name: str, result: dict, digits: int = 5) -> str:
    """One line: plain → tuned, the change with its interval, and "no significant change" when it covers 0."""
    verdict = "" if result["significant"] else " — no significant change"
    # A relative change only means something against a positive baseline (an unbiased KID can be negative).
    pct = f", {100 * result['change'] / result['plain']:+.1f} %" if result["plain"] > 0 else ""
    return (f"{name}: plain {result['plain']:.{digits}f} -> tuned {result['tuned']:.{digits}f} "
            f"(change {result['change']:+.{digits}f}{pct}; {100 * result['level']:.0f} % CI "
            f"[{result['low']:+.{digits}f}, {result['high']:+.{digits}f}]){verdict}")
