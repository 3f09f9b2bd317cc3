"""One callable over a diffusers network: `model_output = denoiser(x_in, t)`, with float t into the embedding.

Every model family is adapted *at the edge* (k-diffusion's `external.py` pattern; the adapters live in
`timetuner.core.families`, one module per family) to this one interface:

    UNet2DModel                      unconditional, pixel or latent space
    UNet2DConditionModel             prompt embeddings; classifier-free guidance (Stable Diffusion); SDXL's pooled
                                     projection and size ids (`addition_embed_type="text_time"`)
    DiTTransformer2DModel,           class labels; classifier-free guidance with the null class; DiT's learned-σ
    Transformer2DModel (DiT config)  output channels split off as `DiTPipeline` does
    SD3Transformer2DModel            prompt and pooled embeddings (Stable Diffusion 3 / 3.5, a flow-matching model);
                                     classifier-free guidance as `StableDiffusion3Pipeline` does
    FluxTransformer2DModel           prompt and pooled embeddings (Flux.1, flow matching) on 2×2-packed latents with
                                     position ids; guidance distilled into an embedding (one call, no CFG batch)
    SanaTransformer2DModel           Gemma prompt embeddings with their attention mask (Sana, flow matching);
                                     classifier-free guidance as `SanaPipeline` does

Conditioning is bound to the denoiser (`Denoiser.bind`), one row per sample of the batches it will see: sample i
of a fit uses prompt (or class label) i mod P. Guidance is applied inside, exactly as the pipelines do —
ε̃ = ε(x, ∅) + s·(ε(x, c) − ε(x, ∅)) from one batched call of 2N (Ho & Salimans, 2022) — so the guided output is
what τ is tuned for. Guidance s ≤ 1 is the conditional output alone, as in the pipelines. A guidance-distilled
network (Flux.1-dev) takes s as an input instead: one call per evaluation, as `FluxPipeline` makes it.

The raw output (ε, v or x0, as the model was trained) is what the scheduler's `step` consumes, so fitting and
sampling hand it on unchanged; `timetuner.core.solver.to_epsilon` converts it where a loss compares noise predictions.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass

import torch

from timetuner.core.families import family_of, network_of
from timetuner.errors import UserError


@dataclass(frozen=True)
class Conditioning:
    """Per-sample conditioning: `values[index[i]]` conditions sample i, `null[index[i]]` is its unconditional twin.

    values  text: prompt embeddings (P, L, D); class: labels (P,)
    null    the same shape: negative-prompt embeddings, or the null class label
    index   (N,) long: which row conditions each sample (i mod P for fitting)
    """

    kind: str  # "text" or "class"
    values: torch.Tensor
    null: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) rows for samples lo…hi−1."""
        idx = self.index[lo:hi]
        return self.values[idx], self.null[idx]

    def slice(self, lo: int, hi: int) -> Conditioning:
        """The conditioning of samples lo…hi−1 alone (to run a part of the batch with its own rows)."""
        return Conditioning(self.kind, self.values, self.null, self.index[lo:hi])

    def fingerprint(self) -> str:
        """A short hash of the tensors: what reference caches are keyed by (prompts, labels, text encoder)."""
        digest = hashlib.sha256(self.kind.encode())
        for tensor in (self.values, self.null, self.index):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def cyclic_index(n: int, rows: int) -> torch.Tensor:
    """Row i mod P for samples 0…n−1: the fixed per-sample conditioning used for fitting and evaluation."""
    return torch.arange(n) % rows


def _refuse_integer_time_embedding(model) -> None:
    """A learned (lookup-table) time embedding cannot take a fractional τ; a guidance embedding is not CFG."""
    config = model.config
    if getattr(config, "time_embedding_type", "positional") == "learned":
        raise UserError("the model's time embedding is learned (time_embedding_type='learned'): it cannot take "
                        "a tuned, fractional timestep; accepted: positional or fourier embeddings")
    if getattr(config, "time_cond_proj_dim", None) is not None:
        raise UserError("the model embeds the guidance scale (time_cond_proj_dim is set, LCM-style) instead of "
                        "classifier-free guidance; accepted: models sampled with classifier-free guidance")


class Denoiser:
    """Wraps a diffusers network (see the module docstring); counts network evaluations (per sample).

    `Denoiser(unet)` is unconditional; `bind(conditioning)` gives a view for one batch layout sharing the network
    and the evaluation counter. A guided evaluation of N samples costs 2N network evaluations and counts 2N.
    `checkpoint=True` recomputes each network call in the backward pass instead of storing its activations
    (gradient checkpointing): e2e fitting differentiates through every call of a K-step trajectory, which for a
    large latent model would not fit in memory otherwise; same gradients, about one more forward pass of time.
    """

    def __init__(self, unet, batch_size: int = 1024, conditioning: Conditioning | None = None,
                 guidance_scale: float | None = None, checkpoint: bool = False,
                 sample_size: int | tuple[int, int] | None = None,
                 frames: int | None = None):
        self.family = family_of(unet)
        _refuse_integer_time_embedding(unet)
        if conditioning is not None and conditioning.kind != self.family.conditional:
            raise UserError(f"{type(unet).__name__} takes {self.family.conditional or 'no'} conditioning, not "
                            f"{conditioning.kind}; accepted: prompts for text models, class labels for DiT")
        self.unet = unet  # the name callers know; any supported network
        self.batch_size = batch_size
        self.conditioning = conditioning
        self.guidance_scale = guidance_scale
        self.checkpoint = checkpoint
        # the state's side, or (height, width) (latent models: image size / VAE factor); None: the model's own
        self.sample_size = sample_size
        self.frames = frames  # video models: latent frames of a state (`loading.state_frames`); None: the pipeline's
        self._count = [0]  # shared with bound views
        self._watchers: list = []  # callables(n) told of every n evaluations (progress bars); shared with views
        param = next(unet.parameters())
        # The network's dtype as its pipeline reads it (diffusers' `ModelMixin.dtype`: a network that keeps some
        # modules in float32, as Wan's does, is fed its weights' dtype, not its first parameter's)
        self.device, self.dtype = param.device, getattr(unet, "dtype", param.dtype)

    @property
    def evaluations(self) -> int:
        """Network evaluations so far, counted per sample, over this denoiser and every bound view."""
        return self._count[0]

    @evaluations.setter
    def evaluations(self, value: int) -> None:
        self._count[0] = value

    @contextlib.contextmanager
    def watch(self, callback):
        """Within the block, `callback(n)` after every call of n evaluations (counted as `evaluations` counts)."""
        self._watchers.append(callback)
        try:
            yield
        finally:
            self._watchers.remove(callback)

    @property
    def guided(self) -> bool:
        """Whether an evaluation is a classifier-free-guided batch of 2N (a distilled network's guidance is not)."""
        return (self.conditioning is not None and self.guidance_scale is not None and self.guidance_scale > 1
                and not self.family.distilled)

    @property
    def per_sample(self) -> int:
        """Network evaluations one sample costs per call, as `evaluations` counts them: 2 when guided, else 1."""
        return 2 if self.guided else 1

    def bind(self, conditioning: Conditioning | None) -> Denoiser:
        """A view with per-sample `conditioning` (same network, same guidance scale, same evaluation counter)."""
        view = copy.copy(self)
        view.conditioning = conditioning
        return view

    def cache_parts(self) -> list:
        """Extra cache-key parts of what this view samples: its conditioning and guidance scale ([] if none)."""
        return [] if self.conditioning is None else [self.conditioning.fingerprint(), self.guidance_scale]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) of a state — (C, F, H, W) for a video model — `sample_size` (and `frames`) when set, else the
        network's own (Flux, Wan: their pipeline's default)."""
        c, family = self.unet.config, self.family
        size = self.sample_size or getattr(c, "sample_size", None) or family.default_sample_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
        channels = family.channels(self.unet)
        if family.default_frames is not None:
            return (channels, self.frames or family.default_frames, h, w)
        return (channels, h, w)

    @property
    def patch(self) -> int:
        """Latents per token side: the pipeline's packing (Flux: 2) times the network's own `patch_size`."""
        patch = getattr(self.unet.config, "patch_size", None) or 1
        return self.family.packing * (patch[-1] if isinstance(patch, (tuple, list)) else patch)

    def dynamic_mu(self, config) -> float:
        """The shift `mu` a pipeline passes a scheduler that shifts by image size (`use_dynamic_shifting`):
        diffusers' `calculate_shift` of the state's token count (Flux: 2×2 packed; SD3: patches), as FluxPipeline
        and StableDiffusion3Pipeline compute it."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        h, w = self.sample_shape[-2:]
        tokens = (h // self.patch) * (w // self.patch)
        return float(calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                     config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                     config.get("max_shift", self.family.max_shift)))

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        """Network output at (float) timestep t — a scalar or one per sample — in float32, guided if bound so."""
        t = torch.as_tensor(t, device=x.device)
        t = t.to(torch.float32).reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.to(torch.float32)
        cond = self.conditioning
        if self.family.conditional is not None and cond is None:
            raise RuntimeError("a conditional network needs Denoiser.bind(conditioning) before it is called")
        if cond is not None and len(cond) != x.shape[0]:
            raise RuntimeError(f"the bound conditioning has {len(cond)} rows but the batch has {x.shape[0]} samples")
        calls = x.shape[0] * self.per_sample
        self.evaluations += calls
        for watcher in self._watchers:
            watcher(calls)
        outs = []
        for lo in range(0, x.shape[0], self.batch_size):
            hi = min(lo + self.batch_size, x.shape[0])
            xb, tb = x[lo:hi].to(self.dtype), t[lo:hi]
            values = null = None
            if cond is not None:
                values, null = (r.to(self.device) for r in cond.rows(lo, hi))
                if values.is_floating_point():
                    values, null = values.to(self.dtype), null.to(self.dtype)
            if self.checkpoint and torch.is_grad_enabled() and (xb.requires_grad or tb.requires_grad):
                from torch.utils.checkpoint import checkpoint

                out = checkpoint(self._forward, xb, tb, values, null, use_reentrant=False)
            else:
                out = self._forward(xb, tb, values, null)
            outs.append(out.to(torch.float32))
        return torch.cat(outs)

    def as_handed(self, output: torch.Tensor) -> torch.Tensor:
        """`output` in the dtype its pipeline hands the scheduler: the network's, for a family whose pipeline keeps
        its latents in float32 and steps on the network's output as it comes (WanPipeline: in bfloat16 the
        scheduler's σ·output is then a bfloat16 product); else as computed (float32)."""
        steps = self.family.steps_network_dtype or self.family.keeps_network_dtype
        return output.to(self.dtype) if steps else output

    def as_kept(self, state: torch.Tensor) -> torch.Tensor:
        """A sampler state in the dtype its pipeline keeps it in: the network's, for a family whose pipeline makes
        its latents in the prompt embeddings' dtype and casts each new state back to it (StableDiffusion3Pipeline,
        FluxPipeline; in bfloat16 every state is then rounded to bfloat16); else as computed (float32)."""
        return state.to(self.dtype) if self.family.keeps_network_dtype else state

    def _forward(self, x, t, values, null):
        if values is None:
            return self.family.call(self.unet, x, t, None)
        if self.family.distilled:
            return self.family.call(self.unet, x, t, values, self.guidance_scale)
        if self.guided:
            return self.family.guided(self.unet, x, t, values, null, float(self.guidance_scale))
        return self.family.call(self.unet, x, t, values)


@torch.no_grad()
def refuse_integer_timesteps(denoiser: Denoiser, num_train_timesteps: int = 1000) -> None:
    """Refuse a network that rounds or truncates its timestep (τ would be ignored between integers).

    A cheap probe: one sample at t = T/2 (an even integer; t = 10 where the network's dtype holds no fraction
    there, bfloat16) and t + 0.5; identical outputs mean the network cast t to an integer somewhere (`.long()`, an
    index into a table, round-half-even). Not counted as evaluations.
    """
    count = denoiser.evaluations
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *denoiser.sample_shape), generator=gen).to(denoiser.device)
    cond = denoiser.conditioning
    probe = denoiser.bind(None if cond is None else Conditioning(cond.kind, cond.values, cond.null,
                                                                 cond.index[:1]))
    t0 = float(2 * (num_train_timesteps // 4))
    if float(torch.tensor(t0 + 0.5, dtype=denoiser.dtype)) == t0:  # bf16 holds no fraction at T/2: probe near 0,
        t0 = 10.0  # where it does (τ's resolution is then the dtype's, exactly as in the pipeline)
    same = torch.equal(probe(x, torch.tensor(t0)), probe(x, torch.tensor(t0 + 0.5)))
    denoiser.evaluations = count
    if same:
        raise UserError(f"{type(denoiser.unet).__name__} gives identical outputs at t = {t0:g} and {t0 + 0.5:g}: it "
                        "casts timesteps to integers, so a tuned fractional τ would be ignored; accepted: networks "
                        "that take float timesteps into their embedding (sinusoidal or Fourier)")


@torch.no_grad()
def text_conditioning(pipe, prompts: list[str], n: int, negative_prompt: str = "") -> Conditioning:
    """Prompt embeddings as the pipeline's `__call__` makes them (its family's `encode`, through the pipeline's own
    `encode_prompt` at `__call__`'s defaults), sample i ↦ i mod P; what a family's network takes besides (a pooled
    projection, an attention mask, SDXL's size factor) rides in the rows as that family packs it. Each prompt list is
    embedded once per pipeline and dtype (remembered on the pipeline: a fit's later runs reuse it, also once the text
    encoders have left the GPU)."""
    encoder = next(pipe.text_encoder.parameters())
    key = (tuple(prompts), negative_prompt, str(encoder.dtype))
    memo = pipe.__dict__.setdefault("_timetuner_embeddings", {})
    if key not in memo:
        memo[key] = _embedded(pipe, list(prompts), negative_prompt, encoder.device)
    return Conditioning("text", *memo[key], cyclic_index(n, len(prompts)))


@torch.no_grad()
def _embedded(pipe, prompts: list[str], negative_prompt: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt rows, negative rows) of `text_conditioning`: the family's `encode`, on the CPU in float32."""
    network = network_of(pipe)
    cond, null = family_of(network).encode(pipe, network, prompts, negative_prompt, device)
    return cond.detach().to("cpu", torch.float32), null.detach().to("cpu", torch.float32)


def class_conditioning(model, labels: list[int], n: int) -> Conditioning:
    """Class labels for a DiT, sample i ↦ label i mod P; null class `num_embeds_ada_norm` (DiTPipeline: 1000)."""
    classes = int(model.config.num_embeds_ada_norm)
    for label in labels:
        if not 0 <= label < classes:
            raise UserError(f"--class-labels {label} is out of range; accepted: integers 0 to {classes - 1}")
    values = torch.tensor(labels, dtype=torch.long)
    return Conditioning("class", values, torch.full_like(values, classes), cyclic_index(n, len(labels)))
