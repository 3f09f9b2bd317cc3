"""Named `UNet2DModel` architectures for `timetuner train --preset`."""

from __future__ import annotations

from dataclasses import dataclass, field

from timetuner.errors import UserError, check_choice


@dataclass(frozen=True)
class Preset:
    """A UNet2DModel architecture plus the training defaults that suit it."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    norm_num_groups: int
    resolution: int  # default image side
    min_resolution: int
    batch_size: int
    learning_rate: float
    description: str
    extra: dict = field(default_factory=dict)

    @property
    def downsample_factor(self) -> int:
        """How many times the image side is halved: resolutions must be multiples of this."""
        return 2 ** (len(self.block_out_channels) - 1)

    def check_resolution(self, name: str, resolution: int) -> None:
        """Raise a UserError unless this architecture can take images of side `resolution`."""
        f = self.downsample_factor
        if resolution < self.min_resolution or resolution % f:
            raise UserError(
                f"--resolution {resolution} does not fit preset {name!r}; accepted: multiples of {f} "
                f"from {self.min_resolution}"
            )

    def unet_config(self, resolution: int, channels: int) -> dict:
        """Keyword arguments for `UNet2DModel(**config)`."""
        return dict(
            sample_size=resolution,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=self.block_out_channels,
            down_block_types=self.down_block_types,
            up_block_types=self.up_block_types,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            # Sinusoidal ("positional") embedding: TimeTuner feeds the network float timesteps.
            time_embedding_type="positional",
            **self.extra,
        )


PRESETS: dict[str, Preset] = {
    "digits-tiny": Preset(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        resolution=8,
        min_resolution=4,
        batch_size=64,
        learning_rate=1e-3,
        description="0.16 M parameters; for tests and smoke runs",
    ),
    "digits": Preset(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        resolution=8,
        min_resolution=8,
        batch_size=128,
        learning_rate=5e-4,
        description="1.1 M parameters, attention at 4×4; the embedded assets/digits-ddpm",
    ),
    "small": Preset(
        block_out_channels=(64, 128, 128, 256),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        resolution=32,
        min_resolution=16,
        batch_size=64,
        learning_rate=2e-4,
        description="about 14 M parameters; 32×32 image folders (CIFAR-sized) on a GPU",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a UserError lists the accepted names otherwise."""
    return PRESETS[check_choice("--preset", name, PRESETS)]
