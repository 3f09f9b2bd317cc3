"""Atomic file output: write beside the target, then rename, so no half-written file is ever left behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[str], object], suffix: str = "") -> Path:
    """Call write(temp_path) in `path`'s folder, give it the usual permissions, rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get what open() would give them
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# -- state dicts without pickle -------------------------------------------------------------------------------------
def save_tree(path: str | Path, tree) -> Path:
    """Write a nested state (dicts, lists, tuples, tensors, numpy arrays, numbers, strings) as one safetensors file.

    Tensors are the file's tensors; the structure is JSON in its metadata (dict keys keep their int/str type), so
    `load_tree` never unpickles anything — what `torch.load(weights_only=False)` would have to.
    """
    import json

    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors: dict = {}

    def encode(value):
        if torch.is_tensor(value) or isinstance(value, np.ndarray):
            name = f"t{len(tensors)}"
            tensors[name] = (torch.from_numpy(value) if isinstance(value, np.ndarray) else value).detach().cpu() \
                .contiguous().clone()
            return {"a" if isinstance(value, np.ndarray) else "x": name}
        if isinstance(value, dict):
            return {"d": [[key, encode(item)] for key, item in value.items()]}
        if isinstance(value, list | tuple):
            return {"t" if isinstance(value, tuple) else "l": [encode(item) for item in value]}
        if isinstance(value, np.generic):
            return {"v": value.item()}
        if value is None or isinstance(value, bool | int | float | str):
            return {"v": value}
        raise TypeError(f"save_tree cannot store a {type(value).__name__}")

    skeleton = json.dumps(encode(tree))
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"tree": skeleton}))


def load_tree(path: str | Path):
    """The state `save_tree` wrote (tensors on the CPU)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        skeleton = json.loads(f.metadata()["tree"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)

    def decode(node):
        (kind, value), = node.items()
        if kind == "x":
            return tensors[value]
        if kind == "a":
            return tensors[value].numpy()
        if kind == "d":
            return {key: decode(item) for key, item in value}
        if kind in ("l", "t"):
            items = [decode(item) for item in value]
            return tuple(items) if kind == "t" else items
        return value

    return decode(skeleton)
