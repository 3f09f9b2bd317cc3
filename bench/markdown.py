"""Render the JSON lines of bench/fit.py as the Markdown tables of the README.

    python bench/fit.py --quick | tee fit.jsonl && python bench/markdown.py fit.jsonl
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    records = [json.loads(line) for line in open(path) if line.strip().startswith("{")]
    quality = [r for r in records if r["figure"] == "quality"]
    if quality:
        print("| solver | grid | NFE | objective | x0 gap plain → tuned | FD plain → tuned | FD change | "
              "headroom removed | verdict | fit s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in quality:
            verdict = "better" if r["better"] else "**not better**"
            print(f"| {r['scheduler']} | {r['trajectory']} | {r['nfe']} | {r['objective']} | "
                  f"{r['gap_plain']:.4f} → {r['gap_tuned']:.4f} ({r['gap_change_pct']:+.1f} %) | "
                  f"{r['fd_plain']:.2f} → {r['fd_tuned']:.2f} | {r['fd_change_pct']:+.1f} % | "
                  f"{r['headroom_removed_pct']} % | {verdict} | {r['fit_seconds']} |")
    for r in records:
        if r["figure"] in ("optimizer", "default_fit", "sampling_time", "machine"):
            print(f"\n`{json.dumps(r)}`")


if __name__ == "__main__":
    main(sys.argv[1])
