"""The core: the denoiser over any diffusers network, the one few-step solver, the named trajectories, model
loading, conditioning, reference samples, the cache, processes and data."""

from timetuner.exports import facade

__all__, __getattr__ = facade(__name__, {
    "Denoiser": "timetuner.core.denoiser",
    "TRAJECTORIES": "timetuner.core.trajectories",
    "Solver": "timetuner.core.solver",
    "initial_noise": "timetuner.core.solver",
    "launch_command": "timetuner.core.distributed",
    "load_digits_tensor": "timetuner.core.data",
    "load_model": "timetuner.core.loading",
    "load_pipeline": "timetuner.core.loading",
    "make_scheduler": "timetuner.core.trajectories",
    "quiet_loading": "timetuner.core.loading",
    "reference_samples": "timetuner.core.reference",
    "sample_images": "timetuner.core.solver",
})
