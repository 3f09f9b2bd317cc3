"""The digits feature extractor: a small CNN classifier whose penultimate layer feeds Fréchet distances.

Inception weights cannot be downloaded on an offline machine and mean little on 8×8 digits, so the
embedded model is measured in the feature space of this classifier, trained on the digits train split.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from timetuner.assets import DIGITS_FEATURES
from timetuner.core.data import load_digits_tensor
from timetuner.errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class DigitsFeatureNet(nn.Module):
    """Conv(32)–Conv(64)–pool–Conv(64)–pool–FC(feature_dim)–FC(10) on 1×8×8 images in [-1, 1]."""

    def __init__(self, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.embed = nn.Linear(64 * 2 * 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """N×1×H×W images in [-1, 1] (resized to 8×8 by area averaging) → N×feature_dim features."""
        if x.shape[1] != 1:
            raise UserError(f"digits features take 1-channel images; got {x.shape[1]} channels")
        if x.shape[-2:] != (8, 8):
            x = F.adaptive_avg_pool2d(x, 8)
        return self.embed(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.dropout(F.relu(self.features(x))))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (zero = background padding), the usual digits augmentation."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + 8, dx:dx + 8]


def train_digits_features(out: str | Path, epochs: int = 60, seed: int = 0, feature_dim: int = 64) -> dict:
    """Train `DigitsFeatureNet` on the digits train split, save it to `out`, return its record."""
    from safetensors.torch import save_file

    if epochs < 1:
        raise UserError(f"--epochs {epochs} is invalid; accepted: integers >= 1")
    out = Path(out)
    x_train, y_train = load_digits_tensor("train")
    x_test, y_test = load_digits_tensor("test")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitsFeatureNet(feature_dim)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(64):
            loss = F.cross_entropy(net(_augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    record = {
        "architecture": "DigitsFeatureNet",
        "feature_dim": feature_dim,
        "epochs": epochs,
        "seed": seed,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "test_accuracy": round(accuracy, 4),
        "train_seconds": round(time.perf_counter() - started, 1),
        "split": "timetuner.core.data.digits_split (stratified 80/20, random_state=0)",
    }
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, Path(tmp) / WEIGHTS_FILE)
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(record, indent=2))
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(Path(tmp) / name, out / name)
    return record


def load_digits_features(path: str | Path | None = None) -> DigitsFeatureNet:
    """The shipped (or a given) digits feature extractor, in eval mode on CPU."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else DIGITS_FEATURES
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not config.is_file():
        raise UserError(f"digits feature extractor {str(folder)!r} lacks {WEIGHTS_FILE} or {CONFIG_FILE}; "
                        "accepted: a folder written by `timetuner train-features`")
    net = DigitsFeatureNet(json.loads(config.read_text())["feature_dim"])
    net.load_state_dict(load_file(weights))
    return net.eval()
