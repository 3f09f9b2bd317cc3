"""Files the project ships and trained itself (see README.md in this folder)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
EMBEDDED_MODEL = ASSETS_DIR / "digits-ddpm"
EMBEDDED_FLOW_MODEL = ASSETS_DIR / "digits-flow"  # the same digits, `timetuner train --objective flow`
EMBEDDED = {"digits-ddpm": EMBEDDED_MODEL, "digits-flow": EMBEDDED_FLOW_MODEL}  # `--model digits-flow`
DIGITS_FEATURES = ASSETS_DIR / "digits-features"
DEFAULT_TABLE = ASSETS_DIR / "tables" / "tau-ddim-uniform-nfe10.safetensors"  # `timetuner fit --nfe 10`
FIT_PROMPTS = ASSETS_DIR / "prompts" / "fit.txt"  # default prompts for fitting text-to-image models
EVAL_PROMPTS = ASSETS_DIR / "prompts" / "eval.txt"  # disjoint default prompts for the held-out verdict
SHIPPED_CACHE = ASSETS_DIR / "cache"  # cache entries the project computed and ships (the reference set)
