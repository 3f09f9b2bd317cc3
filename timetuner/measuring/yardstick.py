"""The yardstick of held-out figures: the distribution gap to the converged sampler (FD/KID against its reference
set), the data FD, their features, and the reference finals the x0 gap is measured against (cached)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from timetuner.core.cache import rows_stored
from timetuner.core.reference import REFERENCE_SET_SEED, reference_block, reference_key, reference_set
from timetuner.errors import UserError
from timetuner.measuring.fid import (
    default_reference,
    extractor_name,
    load_extractor,
    reference_features,
    tensor_features,
)
from timetuner.measuring.metrics import (
    feature_statistics,
    frechet_distance,
    kernel_distance,
    paired_bootstrap,
)

FD_RESAMPLES = 200  # each FD resample costs a matrix square root: capped, whatever --bootstrap asks


DEFAULT_N = 1000  # held-out samples of the distribution gap and data FD (docs/measuring.md)
DEFAULT_LATENT_N = 256  # the same for latent models, whose samples are decoded by the VAE
EVAL_SEED_OFFSET = 1_000_003  # held-out noises come from the fit's seed + this: never the fit's own


DEFAULT_GAP_N = 256  # of which the first this many carry the x0 gap (a paired figure: precise at this size)


DEFAULT_REFERENCE_N = 10_000  # samples of the converged sampler the distribution gap is measured against


@dataclass(frozen=True)
class FidOptions:
    """How FD/KID are measured: the reference set and the feature extractor."""

    ref: str | None = None  # folder, .zip, clean-fid .npz, digits:test / digits:train; None: digits:test for digits
    features: str = "auto"  # auto (digits for digits models, else inception), inception, digits, package.module:factory
    inception_weights: str | None = None


@dataclass
class Measure:
    """A feature extractor with the features (or statistics) of a data reference set: the data FD."""

    extractor: object
    reference: np.ndarray | tuple
    label: str

    @classmethod
    def build(cls, options: FidOptions, is_digits_model: bool, n: int | None, seed: int = 0,
              extractor=None) -> Measure:
        ref = options.ref or default_reference(is_digits_model)
        if ref is None:
            raise UserError("--fid needs a reference set for this model; accepted: --ref FOLDER (or .zip, a "
                            "clean-fid .npz, digits:test)")
        features = resolve_features(options.features, is_digits_model)
        extractor = extractor or load_extractor(features, options.inception_weights)
        reference = reference_features(ref, extractor, n=n, seed=seed)
        return cls(extractor=extractor, reference=reference, label=f"{features} features vs {ref}")

    @property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.reference, tuple):
            return self.reference
        if not hasattr(self, "_stats"):
            self._stats = feature_statistics(self.reference)
        return self._stats

    def features(self, images: torch.Tensor) -> np.ndarray:
        return image_features(images, self.extractor)

    def fd(self, features: np.ndarray) -> float:
        return frechet_distance(features, self.stats)


def image_features(images: torch.Tensor, extractor) -> np.ndarray:
    """Features of images in about [-1, 1] (clamped), through clean-fid's path (`fid.tensor_features`)."""
    return tensor_features(images.clamp(-1, 1), extractor)


def resolve_features(features: str, is_digits_model: bool) -> str:
    """"auto" → the digits features for digits models, Inception otherwise; other names as given."""
    return ("digits" if is_digits_model else "inception") if features == "auto" else features


@dataclass
class Yardstick:
    """What every held-out figure is measured with — fit's verdict, `eval`, `report` and the benches alike.

    - **distribution gap** (primary): FD, and KID, in feature space between a sampler's n final images and N
      images of the converged reference sampler from their own noises (`reference`: the reference set's
      features, `timetuner.core.reference.reference_set`, cached by model hash, sampler and seeds). This is the
      error a sampler-tuning tool is responsible for, measurable as precisely as compute allows.
    - **x0 gap** (primary, `judge`): RMS per image to the reference sampler's image from the same noise.
    - **data FD** (secondary): against held-out data (`data`), as a user's usual FD; never the verdict alone.
    """

    extractor: object  # timetuner.measuring.fid.FeatureExtractor
    label: str  # the feature space, e.g. "digits features"
    reference: np.ndarray | None  # N×D features of the reference set (None: no distribution gap)
    reference_label: str  # e.g. "dpm++-100"
    data: Measure | None = None  # the data reference (data FD); same extractor

    def features(self, images: torch.Tensor) -> np.ndarray:
        return image_features(images, self.extractor)

    @property
    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_ref_stats"):
            self._ref_stats = feature_statistics(self.reference)
        return self._ref_stats

    def dist_gap(self, features: np.ndarray) -> float:
        return frechet_distance(features, self.reference_stats)

    def dist_kid(self, features: np.ndarray) -> float:
        scale = getattr(self.extractor, "kid_scale", 1.0)
        if not hasattr(self, "_kid_cache"):  # the reference's own kernel sums, the same for every sampler judged
            self._kid_cache = {}
        return kernel_distance(features / scale, self.reference / scale, cache=self._kid_cache)

    def figures(self, features: np.ndarray) -> dict:
        """{"dist_gap", "data_fd"} of one sampler's features (those measured)."""
        out = {} if self.reference is None else {"dist_gap": self.dist_gap(features)}
        if self.data is not None:
            out["data_fd"] = self.data.fd(features)
        return out

    def changes(self, plain: np.ndarray, tuned: np.ndarray, bootstrap: int) -> dict:
        """Paired changes plain → tuned, each with its 95 % bootstrap interval over the noises."""
        out = {}
        for name, statistic in (("dist_gap", None if self.reference is None else self.dist_gap),
                                ("data_fd", None if self.data is None else self.data.fd)):
            if statistic is not None:
                out[name] = paired_bootstrap(plain, tuned, statistic=statistic,
                                             resamples=min(bootstrap, FD_RESAMPLES))
        return out

    def describe(self) -> dict:
        out = {"measure": self.label}
        if self.reference is not None:
            out["reference_n"] = int(self.reference.shape[0])
        if self.data is not None:
            out["data_measure"] = self.data.label
        return out


def _applies(model, options: FidOptions) -> bool:
    """Whether a yardstick applies: features not "none", and "auto" only on digits models or with a data reference."""
    return options.features != "none" and (options.features != "auto" or model.is_digits or options.ref is not None)


def _reference_set_key(model, denoiser_for, reference: str, reference_steps: int, block: int, extractor: str) -> str:
    return reference_key("reference-set", model, denoiser_for(0, block), reference, reference_steps,
                         REFERENCE_SET_SEED, block, extractor)


def reference_set_to_compute(model, denoiser_for, reference: str, reference_steps: int, reference_n: int,
                             options: FidOptions | None = None) -> int | None:
    """How many samples of `build_yardstick`'s reference set are not cached yet (0: all are), None where no
    yardstick applies; from the cache file's header and the feature extractor's name (`fid.extractor_name`: the
    network is not loaded, a missing Inception file is said now), no sample computed."""
    options = options or FidOptions()
    if not _applies(model, options):
        return None
    if reference_n <= 0:
        return 0
    block = reference_block(reference_n)
    extractor = extractor_name(resolve_features(options.features, model.is_digits), options.inception_weights)
    key = _reference_set_key(model, denoiser_for, reference, reference_steps, block, extractor)
    have = rows_stored(key) // block * block
    return max(0, -(-reference_n // block) * block - have)


def build_yardstick(model, denoiser_for, reference: str, reference_steps: int, reference_n: int,
                    options: FidOptions | None = None, data: bool = True, progress: bool = True,
                    data_n: int | None = None, world=None) -> Yardstick | None:
    """The yardstick of `model` (a `timetuner.core.loading.ModelSetup`): its reference set of `reference_n` samples of
    the `reference` solver at `reference_steps` (grown in the cache with a progress bar where short), and its data
    reference (a seeded subset of `data_n` images; all by default); None where no feature extractor applies
    (features "none", or "auto" on a non-digits model with no data reference given). `world`: the processes
    (`timetuner.core.distributed`) that share the computing of missing reference blocks."""
    from tqdm.auto import tqdm

    options = options or FidOptions()
    if not _applies(model, options):
        return None
    name = resolve_features(options.features, model.is_digits)
    extractor = load_extractor(name, options.inception_weights)
    data = data and (options.ref is not None or model.is_digits)
    measure = Measure.build(options, model.is_digits, data_n, extractor=extractor) if data else None
    features = None
    if reference_n > 0:
        block = reference_block(reference_n)
        key = _reference_set_key(model, denoiser_for, reference, reference_steps, block, extractor.name)
        bar = None

        def advance(done: int, total: int) -> None:  # a bar only when blocks are computed (not on a cache hit)
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total * block, desc=f"reference set {reference}-{reference_steps}",
                           disable=not progress, dynamic_ncols=True, leave=False)
            bar.update(block if done else 0)

        rows = reference_set(denoiser_for, model.base_config, reference, reference_steps, reference_n,
                             lambda images: image_features(images, extractor), key,
                             images=model.images if model.vae is not None else None, progress=advance, world=world)
        if bar is not None:
            bar.close()
        features = rows.double().numpy()
    return Yardstick(extractor, f"{name} features", features, f"{reference}-{reference_steps}", measure)
