"""Variants of supported networks whose conditioning the fit does not reproduce are refused in one line when loaded:
Flux Fill / Kontext / Control pipelines, Wan image-to-video, networks with extra input channels (inpainting)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlPipeline, FluxKontextPipeline, FluxPipeline

from timetuner.core.loading import load_model
from timetuner.errors import UserError
from timetuner.tiny import quiet, tiny_flux


def _flux_as(cls, transformer=None):
    pipe = tiny_flux(FlowMatchEulerDiscreteScheduler())
    parts = {k: v for k, v in pipe.components.items() if k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                 "text_encoder_2", "tokenizer_2", "transformer")}
    if transformer is not None:
        parts["transformer"] = transformer
    extra = {"image_encoder": None, "feature_extractor": None} if cls is FluxKontextPipeline else {}
    return quiet(cls(**parts, **extra))


@pytest.mark.parametrize("cls", [FluxKontextPipeline, FluxControlPipeline], ids=lambda c: c.__name__)
def test_pipelines_that_condition_on_an_image_are_refused(cls):
    with pytest.raises(UserError, match="conditions on more than a prompt") as err:
        load_model(None, pipeline=_flux_as(cls))
    assert "\n" not in str(err.value)


def test_a_network_with_extra_input_channels_is_refused():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)  # Flux Fill's shape: image and mask channels beside the latents' (here 32 in, 16 out)
    fill = FluxTransformer2DModel(patch_size=1, in_channels=32, out_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    with pytest.raises(UserError, match="32 input channels for 16 output") as err:
        load_model(None, pipeline=_flux_as(FluxPipeline, fill))
    assert "\n" not in str(err.value)
    assert load_model(None, pipeline=_flux_as(FluxPipeline)).flow  # the plain text-to-image pipeline loads


def test_the_default_dtype_is_bfloat16_for_transformer_pipelines_on_a_gpu_and_float32_otherwise(tiny_run, tmp_path):
    from timetuner.core.loading import default_dtype, load_pipeline
    from timetuner.tiny import save_flux

    folder = str(save_flux(tmp_path, True, FlowMatchEulerDiscreteScheduler()))  # with its CLIP and T5 encoders
    assert default_dtype(folder, on_gpu=True) == torch.bfloat16
    assert default_dtype(folder, on_gpu=False) == torch.float32
    assert default_dtype(str(tiny_run), on_gpu=True) == torch.float32  # a UNet pipeline
    pipe = load_pipeline(folder, torch_dtype=torch.bfloat16)  # every component in that dtype, text encoders too
    dtypes = {p.dtype for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
              for p in module.parameters()}
    assert dtypes == {torch.bfloat16}
