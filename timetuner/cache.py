"""The on-disk cache of computed tensors (reference samples and trajectories, reference features).

Entries are safetensors files under `$TIMETUNER_CACHE/references` (default `~/.cache/timetuner`), named by a hash
of everything they depend on (model weights hash, configurations, seeds, counts), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_key(*parts) -> str:
    """A short stable hash of JSON-able parts (model hash, configs, seeds, …)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    root = Path(os.environ.get("TIMETUNER_CACHE", Path.home() / ".cache" / "timetuner")) / "references"
    return root / f"{key}.safetensors"


def cached(key: str | None, compute) -> dict:
    """{name: tensor} from the cache under `key`, else `compute()` written there atomically (None: no cache)."""
    from safetensors.torch import load_file, save_file

    path = cache_path(key) if key else None
    if path is not None and path.is_file():
        try:
            return load_file(path)
        except Exception:  # a damaged cache entry is recomputed
            path.unlink(missing_ok=True)
    tensors = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    return tensors
