"""The core: the denoiser over any diffusers network, the one few-step solver, the named trajectories, model
loading, conditioning, reference samples, the cache, processes and data."""
