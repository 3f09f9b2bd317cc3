"""timetuner: timestep tuning for few-step diffusion sampling, and a training companion."""

__version__ = "0.1.0"

from timetuner.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
