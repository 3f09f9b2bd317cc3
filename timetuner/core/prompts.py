"""What conditional fits are conditioned on: prompt files or texts, class labels, guidance scales — parsed and checked.

Fitting uses fixed per-sample conditioning: sample i of the fit uses prompt (or class label) i mod P, and sample
i of the held-out verdict uses eval prompt i mod P' — a disjoint prompt set, so the verdict measures prompts the
fit never saw. The shipped defaults are `assets/prompts/fit.txt` and `assets/prompts/eval.txt`.
"""

from __future__ import annotations

import math
from pathlib import Path

from timetuner.core.denoiser import class_conditioning, text_conditioning
from timetuner.errors import UserError


def read_prompts(file_or_text: str | None, option: str = "--prompts", default: Path | None = None) -> list[str]:
    """Prompts from a file (one per line; blank lines and lines starting with '#' skipped) or one literal prompt."""
    if file_or_text is None:
        if default is None:
            raise UserError(f"{option} is required; accepted: a prompt file (one per line) or a prompt text")
        file_or_text = str(default)
    path = Path(file_or_text).expanduser()
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
        if not prompts:
            raise UserError(f"{option} {file_or_text!r} holds no prompt; accepted: a text file, one prompt per line")
        return prompts
    if path.suffix == ".txt" or path.is_dir():
        raise UserError(f"{option} {file_or_text!r} is not a readable prompt file; accepted: an existing text "
                        "file (one prompt per line) or a prompt text")
    if not file_or_text.strip():
        raise UserError(f"{option} is empty; accepted: a prompt file (one per line) or a prompt text")
    return [file_or_text.strip()]


def _normal(prompt: str) -> str:
    return " ".join(prompt.split()).casefold()


def check_disjoint(fit_prompts: list[str], eval_prompts: list[str], held_out: str = "--eval-prompts",
                   fitted: str = "--prompts") -> None:
    """Refuse held-out prompts that the fit also uses (compared ignoring case and repeated spaces)."""
    shared = sorted({_normal(p) for p in fit_prompts} & {_normal(p) for p in eval_prompts})
    if shared:
        raise UserError(f"{held_out} shares {len(shared)} prompt(s) with {fitted} (e.g. {shared[0]!r}); "
                        "accepted: disjoint prompt sets, so the held-out verdict measures unseen prompts")


def parse_resolution(text: str | None) -> int | tuple[int, int] | None:
    """'1024' → 1024 (a square image's side); '768x1344' → (768, 1344) (height × width, as pipelines take them)."""
    if text is None:
        return None
    parts = str(text).lower().replace("×", "x").split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        sides = tuple(int(p) for p in parts)
        return sides[0] if len(sides) == 1 or sides[0] == sides[1] else sides
    raise UserError(f"--resolution {text} is invalid; accepted: an image side in pixels (1024) or "
                    "HEIGHTxWIDTH (768x1344)")


def resolution_sides(resolution: int | tuple[int, ...] | list[int]) -> tuple:
    """1024 → (1024,); (768, 1344), or [768, 1344] as a fit's record holds it → (768, 1344)."""
    return tuple(resolution) if isinstance(resolution, (tuple, list)) else (resolution,)


def format_resolution(resolution: int | tuple[int, ...] | list[int]) -> str:
    """1024 → '1024'; (768, 1344) or [768, 1344] → '768x1344' — the inverse of parse_resolution, for messages."""
    return "x".join(str(side) for side in resolution_sides(resolution))


def parse_guidance_scales(text: str | None) -> list[float | None]:
    """'3,5,7.5' → [3.0, 5.0, 7.5]; None → [None] (the pipeline's default scale). Each finite, ≥ 1, distinct."""
    if text is None:
        return [None]
    scales: list[float | None] = []
    for part in str(text).split(","):
        try:
            value = float(part.strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 1:
            raise UserError(f"--guidance-scale {part.strip()!r} is invalid; accepted: numbers >= 1 separated by "
                            "commas, e.g. 7.5 or 3,5,7.5 (1 means no classifier-free guidance)")
        if value in scales:
            raise UserError(f"--guidance-scale lists {value:g} twice; accepted: distinct scales, e.g. 3,5,7.5")
        scales.append(value)
    return scales


def parse_class_labels(text: str | None, option: str = "--class-labels") -> list[int] | None:
    """'1,2,3' → [1, 2, 3] (range checked against the model later); None stays None."""
    if text is None:
        return None
    labels = []
    for part in str(text).split(","):
        try:
            labels.append(int(part.strip()))
        except ValueError:
            raise UserError(f"{option} {part.strip()!r} is not a class label; accepted: integers separated by "
                            "commas, e.g. 207,360,387") from None
    return labels


def scale_tag(scale: float) -> str:
    """The guidance scale as written in file names: 7.5 → 'cfg7.5', 3.0 → 'cfg3'."""
    return f"cfg{scale:g}"


TEXT_OPTIONS = ("--prompts", "--eval-prompts", "--negative-prompt")
CLASS_OPTIONS = ("--class-labels", "--eval-class-labels")


def check_applies(kind: str | None, model_label: str, given: dict) -> None:
    """Refuse conditioning options (name → value; None: not given) that do not fit the model's kind."""
    names = [name for name, value in given.items() if value is not None]
    if kind is None and names:
        raise UserError(f"{names[0]} applies to conditional models, and {model_label} is unconditional; "
                        "accepted: text-to-image (Stable Diffusion) or class-conditional (DiT) pipelines")
    own, foreign, what, takes = ((TEXT_OPTIONS, CLASS_OPTIONS, "class-conditional", "prompts") if kind == "text"
                                 else (CLASS_OPTIONS, TEXT_OPTIONS, "text-to-image", "class labels"))
    for name in names:
        if name in foreign:
            accepted = " / ".join(n for n in own if n in given)
            raise UserError(f"{name} applies to {what} models, and {model_label} takes {takes}; "
                            f"accepted: {accepted}")


def prompt_set(value, option: str, default: Path | None = None) -> tuple[str, ...]:
    """Prompts from a file or text (`read_prompts`), or a sequence of prompt texts, checked non-empty."""
    if value is None or isinstance(value, str):
        return tuple(read_prompts(value, option, default))
    if not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"{option} holds an empty prompt; accepted: non-empty prompt texts")
    return tuple(value)


def rotated(rows, lo: int) -> tuple:
    """`rows` rotated so that sample lo of a set takes row lo mod P (sample i: row i mod P): the rows of a block
    of samples that starts at lo."""
    rows = list(rows)
    k = lo % len(rows)
    return tuple(rows[k:] + rows[:k])


def conditioning_for(kind: str | None, pipeline, network, rows: tuple, n: int, negative_prompt: str = ""):
    """Per-sample conditioning of n samples from prompts or class labels (sample i: row i mod P); None if
    the model is unconditional. Text models embed the prompts with the pipeline's own `encode_prompt`."""
    if kind is None:
        return None
    if kind == "class":
        return class_conditioning(network, list(rows), n)
    if pipeline is None or getattr(pipeline, "encode_prompt", None) is None:
        raise UserError("a text-conditional network needs its pipeline (text encoder and tokenizer) to embed "
                        "the prompts; accepted: fit(model=...) or fit(pipeline=...)")
    return text_conditioning(pipeline, list(rows), n, negative_prompt)
