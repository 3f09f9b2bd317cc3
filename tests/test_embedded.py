"""The embedded digits model and the digits feature extractor that measures it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from timetuner.assets import EMBEDDED_MODEL
from timetuner.core.data import load_digits_tensor
from timetuner.core.solver import initial_noise, sample_images
from timetuner.core.trajectories import make_scheduler
from timetuner.measuring.features import load_digits_features
from timetuner.measuring.metrics import digits_fd


def test_embedded_model_loads_with_plain_diffusers():
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import DDPMPipeline
        pipe = DDPMPipeline.from_pretrained({str(EMBEDDED_MODEL)!r})
        out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
        assert out.shape == (2, 8, 8, 1), out.shape
        assert not any(name.startswith("timetuner") for name in sys.modules), "timetuner was imported"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_feature_extractor_classifies_held_out_digits():
    net = load_digits_features()
    x, y = load_digits_tensor("test")
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.95


def test_fd_floor_is_low_and_noise_is_far_above_it():
    held_out = load_digits_tensor("test")[0]
    floor = digits_fd(held_out, reference="train")
    noise = digits_fd(torch.randn(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1))
    assert floor < 20 and noise > 20 * floor


@pytest.mark.slow  # 100-step sampling of 200 digits (~13 s)
def test_embedded_model_samples_are_recognisable_digits():
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(EMBEDDED_MODEL / "unet").eval()
    base = DDPMScheduler.from_pretrained(EMBEDDED_MODEL / "scheduler").config
    noise = initial_noise(200, (1, 8, 8), torch.Generator().manual_seed(1234))
    images = sample_images(unet, make_scheduler("ddim", base), noise, num_inference_steps=100)
    with torch.no_grad():
        probs = load_digits_features()(images).softmax(1)
    # The classifier is confident on real digits; on recognisable samples it is too, and all classes occur.
    assert probs.max(1).values.mean() > 0.9
    assert len(set(probs.argmax(1).tolist())) == 10
    noise_fd = digits_fd(torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1))
    assert digits_fd(images) < 0.1 * noise_fd
