"""The on-disk cache of computed tensors (reference samples, trajectories and feature sets, reference features).

Entries are safetensors files under `$TIMETUNER_CACHE/references` (default `~/.cache/timetuner`), named by a hash
of everything they depend on (model weights hash, configurations, seeds, counts), written atomically, and holding
a SHA-256 of their own tensors: an entry whose contents do not match it (a truncated or altered file) is reported,
deleted and recomputed, never used. `grown` keeps row sets that are extended on demand (the reference set of the
distribution gap): the first n rows are the same whatever size the set has grown to. Entries the project ships
(`timetuner.assets.SHIPPED_CACHE`, e.g. the embedded model's reference set) are found under the same key and
checked the same way, so a fresh install does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from timetuner import assets
from timetuner.core.distributed import SOLO


def cache_key(*parts) -> str:
    """A short stable hash of JSON-able parts (model hash, configs, seeds, …)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    root = Path(os.environ.get("TIMETUNER_CACHE", Path.home() / ".cache" / "timetuner")) / "references"
    return root / f"{key}.safetensors"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read(key: str | None) -> dict | None:
    """The entry under `key` if present and intact; a damaged one is reported, deleted and None returned."""
    from safetensors import safe_open

    path = cache_path(key) if key else None
    if path is None:
        return None
    if not path.is_file():
        shipped = _shipped(key)
        if shipped is None:
            return None
        path = shipped
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get("sha256")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        if expected is None:  # written before entries carried their hash: recomputed, not trusted
            if path == cache_path(key):
                path.unlink(missing_ok=True)
            return None
        intact = digest(tensors) == expected
    except Exception:  # a truncated or garbled file
        intact = False
    if intact:
        return tensors
    warnings.warn(f"cache entry {path} is damaged (its contents do not match its SHA-256); rebuilding it",
                  stacklevel=3)
    if path == cache_path(key):
        path.unlink(missing_ok=True)
    return None


def exists(key: str | None) -> bool:
    """Whether an entry is stored (or shipped) under `key`, unchecked: for estimates, not for use."""
    return key is not None and (cache_path(key).is_file() or _shipped(key) is not None)


def rows_stored(key: str | None, name: str = "rows") -> int:
    """How many rows of tensor `name` are stored (or shipped) under `key`, from the file's header alone (unchecked:
    for estimates, not for use); 0 when none."""
    from safetensors import safe_open

    if not exists(key):
        return 0
    path = cache_path(key) if cache_path(key).is_file() else _shipped(key)
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice(name).get_shape()[0]) if name in f.keys() else 0  # noqa: SIM118
    except Exception:  # unreadable: the build that follows says so and rebuilds it
        return 0


def _shipped(key: str) -> Path | None:
    path = assets.SHIPPED_CACHE / f"{key}.safetensors"
    return path if path.is_file() else None


def write(key: str | None, tensors: dict[str, torch.Tensor]) -> None:
    """Store `tensors` under `key` (atomically, with their SHA-256); nothing when key is None."""
    from safetensors.torch import save_file

    if key is None:
        return
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata={"sha256": digest(tensors)})
    os.replace(tmp, path)


def cached(key: str | None, compute) -> dict:
    """{name: tensor} from the cache under `key`, else `compute()` written there atomically (None: no cache)."""
    tensors = read(key)
    if tensors is None:
        tensors = compute()
        write(key, tensors)
    return tensors


def grown(key: str | None, n: int, block: int, compute_block, progress=None, world=None) -> torch.Tensor:
    """The first n rows of a row set computed `block` rows at a time (`compute_block(i)` → rows of block i).

    The cached set is extended by the missing blocks only, so asking for more rows than are cached grows the cache
    rather than recomputing it; `progress(done, total)` is called before the first new block and after each.
    Several processes (`world`, a `timetuner.core.distributed.World`) take turns over the missing blocks; the main
    process writes the entry, from the count of blocks it read.
    """
    world = world or SOLO
    have = read(key)
    rows = have["rows"] if have is not None else None
    count = world.broadcast(0 if rows is None else rows.shape[0] // block)
    rows = None if count == 0 else rows[: count * block]
    needed = -(-n // block)
    if progress is not None and needed > count:
        progress(0, needed - count)
    for start in range(count, needed, world.size):
        mine = start + world.rank
        new = compute_block(mine).detach().cpu() if mine < needed else None
        for i, part in enumerate(world.gather_objects(new)):
            if part is None:
                continue
            rows = part if rows is None else torch.cat([rows, part])
            if progress is not None:
                progress(start + i + 1 - count, needed - count)
        if world.is_main:
            write(key, {"rows": rows})  # after every round: an interrupted run keeps what it computed
    return rows[:n]
