"""What `timetuner fit --plan` says a default fit costs on SD 1.5, SDXL, SD3.5-medium and Flux.1-dev, in network
evaluations (docs/conditional.md and docs/flow.md, "Running on a real checkpoint").

    python bench/plan_real.py                 # NFE 10, the defaults of `timetuner fit`
    python bench/plan_real.py --nfe 5

No hub access here: each model is a stand-in with the real pipeline class and the real scheduler configuration but
one-block networks (`timetuner.tiny`). A plan's evaluation counts depend on the pipeline (guided or
distilled), the scheduler (auto's candidates, its solver's evaluations) and the fit's settings, not on the network's
size, so these counts are the real models'; the time per evaluation is not (`--plan` times it on your machine).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def stand_ins(root: Path) -> dict[str, Path]:
    """{name: saved pipeline folder} with each real model's pipeline class and scheduler configuration."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from timetuner.tiny import save_flux, save_sd3, tiny_sdxl, tiny_tokenizer, tiny_vae

    tokenizer, vocab = tiny_tokenizer(root / "tok")
    torch.manual_seed(0)
    sd = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                            cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8),
        vae=tiny_vae(), tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                                  pad_token_id=1)),
        scheduler=diffusers.PNDMScheduler(**SCALED_LINEAR, skip_prk_steps=True, set_alpha_to_one=False),
        requires_safety_checker=False)
    sd.save_pretrained(root / "sd15")
    tiny_sdxl(root / "sdxl-parts").save_pretrained(root / "sdxl")
    save_sd3(root / "sd35", diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    save_flux(root / "fluxdev", True, diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096))
    return {"SD 1.5": root / "sd15", "SDXL": root / "sdxl", "SD3.5-medium": root / "sd35" / "sd3",
            "Flux.1-dev": root / "fluxdev" / "flux"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, default=10)
    args = parser.parse_args()
    from timetuner.core import quiet_loading
    from timetuner.fitting import plan

    quiet_loading()
    root = Path(tempfile.mkdtemp())
    for name, folder in stand_ins(root).items():
        lines = plan(str(folder), nfe=args.nfe)  # `timetuner fit --model … --nfe N --plan`: auto, the defaults
        total = lines[0].split(" network evaluations")[0].removeprefix("plan: ")
        print(f"## {name}, NFE {args.nfe}: {total} network evaluations")
        print("\n".join(lines[1:-1]))  # the time and the memory are the stand-in's on this machine, not the model's
        print()


if __name__ == "__main__":
    main()
