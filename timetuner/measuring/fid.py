"""FID and KID through clean-fid: feature extractors, image folders and cached reference features.

One path for every extractor (Inception, the shipped digits network, a user's torch module), the one
clean-fid's "clean" mode takes: images quantised to uint8 as if saved to PNG → the extractor's resize on each
H×W×3 array (Inception: PIL bicubic to 299², `cleanfid.resize.build_resizer("clean")`) → clean-fid's
`get_batch_features` / `get_files_features` → clean-fid's Fréchet and kernel distances
(`timetuner.measuring.metrics`). Reference features from a folder, a .zip or a built-in dataset are cached on disk
(`$TIMETUNER_CACHE/references`), keyed by the extractor and the files' names, sizes and modification times.

    extractor = load_extractor("inception")                 # needs inception-2015-12-05.pt (see below)
    ref = reference_features("imagenet-val/", extractor, n=10_000)
    fd = frechet_distance(tensor_features(samples, extractor), ref)
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from timetuner.assets import DIGITS_FEATURES
from timetuner.core.cache import cache_key, cached
from timetuner.core.data import load_digits_tensor
from timetuner.errors import UserError
from timetuner.files import write_atomic
from timetuner.measuring.features import WEIGHTS_FILE, load_digits_features

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
INCEPTION_ENV = "TIMETUNER_INCEPTION_WEIGHTS"
OFFLINE_ENVS = ("TIMETUNER_OFFLINE", "HF_HUB_OFFLINE")
DATASETS = ("digits:test", "digits:train")


@dataclass
class FeatureExtractor:
    """What clean-fid needs: `model` maps N×3×H×W floats in [0, 255] to N×D features; `fn_resize` maps one
    H×W×3 uint8 array to the model's input size (uint8 or float32, as clean-fid's resizers return)."""

    name: str  # identifies the extractor in cache keys
    model: Callable[[torch.Tensor], torch.Tensor]
    fn_resize: Callable[[np.ndarray], np.ndarray]
    device: torch.device = torch.device("cpu")
    # KID's kernel (x·y/d + 1)³ assumes features of order one, like Inception's pooled activations; features
    # far larger drown its constant term and leave the estimate noise-dominated. KID divides by this first.
    kid_scale: float = 1.0

    @classmethod
    def from_module(cls, module: torch.nn.Module, name: str, size: tuple[int, int] | None = None,
                    device: torch.device | None = None) -> FeatureExtractor:
        """A user's torch module (N×3×H×W in [0, 255] → N×D) as an extractor; `size` resizes with PIL bicubic."""
        from cleanfid.resize import make_resizer

        device = device or next(module.parameters(), torch.empty(0)).device
        resize = make_resizer("PIL", False, "bicubic", tuple(size)) if size else _as_float
        module = module.eval().to(device)
        return cls(name=name, model=lambda x: module(x).flatten(1), fn_resize=resize, device=device)


def _as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32)


# -- extractors ------------------------------------------------------------------------------------------------
def _offline() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in OFFLINE_ENVS)


def _cache_root() -> Path:
    return Path(os.environ.get("TIMETUNER_CACHE", Path.home() / ".cache" / "timetuner"))


def inception_weights(path: str | None = None) -> Path:
    """The Inception weights file: `path`, $TIMETUNER_INCEPTION_WEIGHTS, the cache, or clean-fid's /tmp copy.

    When none exists and the machine is not marked offline ($TIMETUNER_OFFLINE / $HF_HUB_OFFLINE), it is
    downloaded into the cache once; otherwise a one-line error says where to put it.
    """
    given = path or os.environ.get(INCEPTION_ENV)
    if given:
        if not Path(given).is_file():
            raise UserError(f"Inception weights {given!r} do not exist; accepted: the file {INCEPTION_FILE} "
                            f"({INCEPTION_URL})")
        return Path(given)
    candidates = inception_candidates()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    how = (f"download {INCEPTION_URL} and pass --inception-weights FILE or set {INCEPTION_ENV}=FILE; "
           "offline, use --features digits (digits models) or your own module (--features package.module:factory)")
    if _offline():
        raise UserError(f"Inception weights {INCEPTION_FILE} are not on this machine (looked in "
                        f"{', '.join(str(c) for c in candidates)}) and downloads are off; {how}")
    return _download(INCEPTION_URL, candidates[0], how)


def inception_candidates() -> list[Path]:
    """Where the weights are looked for: the timetuner cache, then /tmp, where clean-fid itself downloads them."""
    return [_cache_root() / INCEPTION_FILE, Path("/tmp") / INCEPTION_FILE]


def _download(url: str, target: Path, how: str) -> Path:
    import urllib.request

    def fetch(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)

    try:
        return write_atomic(target, fetch, ".pt")
    except OSError as err:
        raise UserError(f"Inception weights {target.name} could not be downloaded ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); {how}") from None


def inception_extractor(weights: str | None = None, device: torch.device | None = None) -> FeatureExtractor:
    """clean-fid's Inception-V3 (the TorchScript port of the TF FID network), "clean" resize to 299²."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    path = inception_weights(weights)
    # 299² Inception passes dominate FID time: on the GPU when there is one, as the sampling itself.
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        # clean-fid loads <folder>/inception-2015-12-05.pt; a file of another name is linked into a temp folder.
        folder = path.parent if path.name == INCEPTION_FILE else _linked_folder(path)
        model = InceptionV3W(str(folder), download=False, resize_inside=False).to(device).eval()
    except (RuntimeError, OSError, AttributeError) as err:
        raise UserError(f"Inception weights {str(path)!r} cannot be loaded ({err.__class__.__name__}); accepted: "
                        f"the TorchScript file {INCEPTION_FILE} from {INCEPTION_URL}") from None
    return FeatureExtractor(name=_inception_name(path), model=model, fn_resize=build_resizer("clean"), device=device)


def _inception_name(path: Path) -> str:
    return f"inception:{_file_digest(path)}"


def _linked_folder(path: Path) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="timetuner-inception-"))
    (folder / INCEPTION_FILE).symlink_to(path.resolve())
    return folder


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _content_digest(path: Path) -> str:
    """SHA-256 of a (small) file's bytes: the same on every install, so cache keys made with it can ship."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def digits_extractor(path: str | None = None) -> FeatureExtractor:
    """The shipped digits network (64-d penultimate layer) on clean-fid's inputs: grey = channel mean."""
    net = load_digits_features(path)

    def model(x: torch.Tensor) -> torch.Tensor:
        return net.features(x.float().mean(dim=1, keepdim=True) / 127.5 - 1.0)

    extractor = FeatureExtractor(name=_digits_name(path), model=model, fn_resize=_as_float)
    # Its features are ~40x Inception's scale (x·y/d ≈ 20 on digits): KID uses them in units of their spread
    # on the training digits, a constant of the extractor.

    extractor.kid_scale = float(tensor_features(load_digits_tensor("train")[0], extractor).std())
    return extractor


def _digits_name(path: str | None) -> str:
    return f"digits:{_content_digest(Path(path or DIGITS_FEATURES) / WEIGHTS_FILE)}"


def module_extractor(spec: str) -> FeatureExtractor:
    """`package.module:factory` → factory() returns a torch module (N×3×H×W in [0, 255] → N×D features).

    The module may carry `input_size = (H, W)`; images are then resized to it (PIL bicubic) first.
    """
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"--features {spec!r} cannot be imported ({err.__class__.__name__}); accepted: inception, "
                        "digits, or package.module:factory returning a torch module") from None
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"--features {spec!r} returned {type(module).__name__}; accepted: a factory returning a "
                        "torch.nn.Module")
    return FeatureExtractor.from_module(module, name=f"module:{spec}", size=getattr(module, "input_size", None))


def load_extractor(features: str, inception_weights_path: str | None = None) -> FeatureExtractor:
    """`features` = "inception", "digits" or "package.module:factory"."""
    if features == "inception":
        return inception_extractor(inception_weights_path)
    if features == "digits":
        return digits_extractor()
    if ":" in features:
        return module_extractor(features)
    raise UserError(f"--features {features!r} is not known; accepted: inception, digits, package.module:factory")


def extractor_name(features: str, inception_weights_path: str | None = None) -> str:
    """The name `load_extractor(features, …)` gives its extractor (cache keys hold it), from its weights' digest
    without loading the network (a user's module is loaded); a missing Inception file is said here, as loading it
    would say it."""
    if features == "inception":
        return _inception_name(inception_weights(inception_weights_path))
    if features == "digits":
        return _digits_name(None)
    return load_extractor(features).name


# -- features --------------------------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N×C×H×W images in [-1, 1] → N×H×W×3 uint8, exactly as saving them to PNG (and reading as RGB) would."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise UserError(f"images with {x.shape[1]} channels cannot be measured; accepted: 1 or 3 channels")
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _to_input(image: np.ndarray, extractor: FeatureExtractor) -> torch.Tensor:
    """One H×W×3 uint8 array → C×H'×W' float in [0, 255], as clean-fid's ResizeDataset does it."""
    resized = extractor.fn_resize(image)
    if resized.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1).astype(np.float32)))


def tensor_features(images: torch.Tensor, extractor: FeatureExtractor, batch_size: int = 64) -> np.ndarray:
    """Features (N×D, float64) of N×C×H×W images in [-1, 1] through clean-fid's `get_batch_features`."""
    from cleanfid.fid import get_batch_features

    arrays = to_uint8(images)
    feats = []
    for start in range(0, len(arrays), batch_size):
        batch = torch.stack([_to_input(a, extractor) for a in arrays[start:start + batch_size]])
        feats.append(get_batch_features(batch, extractor.model, extractor.device))
    return np.concatenate(feats).astype(np.float64)


# -- reference sets --------------------------------------------------------------------------------------------
def _list_files(ref: str) -> list[str]:
    from cleanfid.utils import EXTENSIONS

    if ref.lower().endswith(".zip"):
        try:
            names = zipfile.ZipFile(ref).namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"--ref {ref!r} is not a readable zip ({err.__class__.__name__}); accepted: a folder "
                            "or .zip of images") from None
        files = sorted(n for n in set(names) if os.path.splitext(n)[1].lower()[1:] in EXTENSIONS)
    else:
        files = sorted(str(p) for p in Path(ref).rglob("*") if p.suffix.lower()[1:] in EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"--ref {ref!r} holds no images; accepted suffixes: {', '.join(sorted(EXTENSIONS))}")
    return files


def _image_sizes(ref: str, files: list[str]) -> dict[tuple[int, int], str]:
    """{(width, height): first file of that size} — read from the image headers only."""
    from PIL import Image, UnidentifiedImageError

    archive = zipfile.ZipFile(ref) if ref.lower().endswith(".zip") else None
    sizes: dict[tuple[int, int], str] = {}
    for name in files:
        try:
            handle = archive.open(name) if archive else open(name, "rb")
            with handle, Image.open(handle) as im:
                sizes.setdefault(im.size, name)
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"reference image {name!r} cannot be read ({err.__class__.__name__}); accepted: files "
                            "PIL can open") from None
    return sizes


def check_reference(ref: str, n: int | None = None) -> list[str]:
    """The image files of a folder or .zip `ref`, after checking it exists, holds ≥ n images of one size."""
    if not os.path.exists(ref):
        raise UserError(f"--ref {ref!r} does not exist; accepted: a folder or .zip of images, a clean-fid .npz of "
                        f"statistics, or {', '.join(DATASETS)}")
    if not (os.path.isdir(ref) or ref.lower().endswith(".zip")):
        raise UserError(f"--ref {ref!r} is a file; accepted: a folder or .zip of images, or a .npz of statistics")
    files = _list_files(ref)
    if n is not None and len(files) < n:
        raise UserError(f"--ref {ref!r} holds {len(files)} images; --n {n} needs at least {n} (an FD against fewer "
                        f"reference images than samples is biased); accepted: --n <= {len(files)}")
    sizes = _image_sizes(ref, files)
    if len(sizes) > 1:
        shown = "; ".join(f"{w}x{h} ({Path(name).name})" for (w, h), name in list(sizes.items())[:3])
        raise UserError(f"--ref {ref!r} mixes image sizes ({shown}); accepted: a reference set of one size")
    return files


def _subset(files: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(files):
        return files
    keep = np.sort(np.random.default_rng(seed).choice(len(files), size=n, replace=False))
    return [files[i] for i in keep]


def reference_features(ref: str, extractor: FeatureExtractor, n: int | None = None, seed: int = 0,
                       batch_size: int = 64) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Reference features for `ref`: an image folder or .zip (n of them, a seeded subset), a built-in dataset
    (digits:test, digits:train), or a clean-fid statistics .npz (returns (mu, sigma): FD only).

    Folder and dataset features are cached on disk; a changed, added or removed file changes the key.
    """
    if ref in DATASETS:
        images = load_digits_tensor(ref.split(":")[1])[0]
        if n is not None and len(images) < n:
            raise UserError(f"--ref {ref} holds {len(images)} images; --n {n} needs at least {n}; accepted: "
                            f"--n <= {len(images)}")
        idx = _subset(list(range(len(images))), n, seed)
        key = cache_key("fid-reference", extractor.name, ref, idx)
        return cached(key, lambda: {"features": torch.from_numpy(tensor_features(images[idx], extractor))}
                       )["features"].numpy()
    if ref.lower().endswith(".npz") and os.path.isfile(ref):
        return _npz_statistics(ref)
    files = _subset(check_reference(ref, n), n, seed)
    if ref.lower().endswith(".zip"):
        listing = [_file_digest(Path(ref))]
    else:
        listing = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = cache_key("fid-reference", extractor.name, os.path.abspath(ref), listing)

    def compute():
        from cleanfid.fid import get_files_features

        feats = get_files_features(files, extractor.model, num_workers=0, batch_size=batch_size,
                                   device=extractor.device, mode="clean", custom_fn_resize=extractor.fn_resize,
                                   fdir=ref if ref.lower().endswith(".zip") else None, verbose=False)
        return {"features": torch.from_numpy(feats.astype(np.float64))}

    return cached(key, compute)["features"].numpy()


def _npz_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        stats = np.load(path, allow_pickle=False)
        mu, sigma = np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64)
    except (KeyError, ValueError, OSError) as err:
        raise UserError(f"--ref {path!r} is not a statistics file ({err.__class__.__name__}); accepted: a .npz "
                        "with arrays mu and sigma, as clean-fid writes them") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UserError(f"--ref {path!r} holds mu {mu.shape} and sigma {sigma.shape}; accepted: mu (D,), sigma (D, D)")
    return mu, sigma


def default_reference(model_is_digits: bool) -> str | None:
    """The reference a model is measured against when none is given: the held-out digits for digits models."""
    return "digits:test" if model_is_digits else None
