"""Render the JSON lines of bench/fit.py and bench/train.py as the Markdown tables of docs/results.md.

    python bench/fit.py | tee fit.jsonl && python bench/markdown.py fit.jsonl
    python bench/train.py --steps 1200 --eval-every 200 | tee train.jsonl && python bench/markdown.py train.jsonl
    python bench/markdown.py bench/results/solvers.jsonl          # the leaderboard (bench/solvers.py)
"""

from __future__ import annotations

import json
import sys


def _cell(figure: dict | None, digits: int) -> str:
    """plain → tuned (change %, 95 % interval of the change relative to plain; "n.s." when it covers zero)."""
    if figure is None:
        return "—"
    low, high = figure["ci"]
    plain = figure["plain"]
    flag = "" if figure["significant"] else " n.s."
    return (f"{plain:.{digits}f} → {figure['tuned']:.{digits}f} ({figure['change_pct']:+.1f} % "
            f"[{100 * low / plain:+.1f}, {100 * high / plain:+.1f}]{flag})")


def quality_table(quality: list[dict]) -> None:
    sets = quality[0].get("sets", 1) if quality else 1
    print(f"| solver | grid | NFE | objective | distribution gap plain → tuned | x0 gap plain → tuned | "
          f"data FD plain → tuned (secondary) | verdict | fit s |   (means over {sets} held-out noise sets)")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in quality:
        verdict = "better" if r["better"] else "**not better**"
        print(f"| {r['scheduler']} | {r['trajectory']} | {r['nfe']} | {r['objective']} | "
              f"{_cell(r.get('dist_gap'), 2)} | {_cell(r.get('x0_gap'), 4)} | {_cell(r.get('data_fd'), 2)} | "
              f"{verdict} | {r['fit_seconds']} |")


def gap_nfe_figure(quality: list[dict], path: str = "bench/results/gap_vs_nfe.png", objective: str = "e2e") -> None:
    """Distribution gap against NFE, plain and tuned, one panel per solver/grid, from the quality rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from timetuner.measuring.plots import draw_nfe_curve, save_figure

    configs = sorted({(r["scheduler"], r["trajectory"]) for r in quality})
    fig, axes = plt.subplots(1, len(configs), figsize=(3.2 * len(configs), 3.0), squeeze=False)
    for ax, (scheduler, trajectory) in zip(axes[0], configs, strict=True):
        rows = []
        for r in quality:
            if (r["scheduler"], r["trajectory"]) != (scheduler, trajectory) or r["objective"] != objective:
                continue
            g = r["dist_gap"]
            rows.append({"nfe": r["nfe"], "plain": g["plain"], "tuned": g["tuned"],
                         "change": {"change": g["tuned"] - g["plain"], "low": g["ci"][0], "high": g["ci"][1]}})
        draw_nfe_curve(ax, rows)
        ax.set_title(f"{scheduler} / {trajectory}", fontsize=9)
        ax.set_xlabel("steps")
    axes[0][0].set_ylabel("distribution gap to DPM-Solver++ 100")
    axes[0][0].legend(fontsize=7)
    print(f"wrote {save_figure(fig, path)}")


def optimizer_table(rows: list[dict]) -> None:
    print("| optimiser | fit network evaluations | all evaluations (incl. held-out check) | wall s | "
          "held-out paper loss plain → tuned | held-out x0 gap plain → tuned |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']}{' (' + str(r['adam_iters']) + ' it/τ)' if r['adam_iters'] else ''} | "
              f"{r['fit_network_evaluations']:,} | {r['network_evaluations']:,} | {r['seconds']} | "
              f"{r['held_out_paper_loss_plain']:.4f} → {r['held_out_paper_loss_tuned']:.4f} | "
              f"{r['gap_plain']:.4f} → {r['gap_tuned']:.4f} |")
    if len(rows) == 2:
        search, adam = rows
        fit_ratio = adam["fit_network_evaluations"] / search["fit_network_evaluations"]
        all_ratio = adam["network_evaluations"] / search["network_evaluations"]
        print(f"\nsearch uses 1/{fit_ratio:.1f} of adam's fit evaluations (1/{all_ratio:.1f} counting the held-out "
              "check both share).")


def train_tables(speedup: list[dict], overhead: list[dict], draw: list[dict]) -> None:
    if speedup:
        print("| method | iterations to uniform's final FD: speed-up (median, range over seeds) | per seed | "
              "final FD mean (range) |")
        print("|---|---|---|---|")
        for r in speedup:
            reached = sum(v is not None for v in r["ratio_per_seed"])
            ratio = "not reached" if r["ratio_median"] is None else (
                f"{r['ratio_median']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
                + (f" on the {reached} of {len(r['ratio_per_seed'])} seeds that reach it"
                   if reached < len(r["ratio_per_seed"]) else ""))
            per_seed = ", ".join("—" if v is None else f"{v:.2f}" for v in r["ratio_per_seed"])
            low, high = r["final_fd_range"]
            print(f"| {r['method']} | {ratio} | {per_seed} | {r['final_fd_mean']:.2f} ({low:.2f}–{high:.2f}) |")
    if overhead:
        cost = {r["method"]: r["ms_per_step"] for r in draw}
        print("\n| method | seconds / training step | overhead vs uniform | draw + weight alone, ms / step |")
        print("|---|---|---|---|")
        for r in overhead:
            print(f"| {r['method']} | {r['seconds_per_step']:.4f} | {r['overhead_pct']:+.1f} % | "
                  f"{cost.get(r['method'], '—')} |")


def _versus(figure: dict | None) -> str:
    """ratio to the best plain configuration [95 % interval of the change, relative]; "n.s." when it covers 0."""
    if figure is None:
        return "—"
    return (f"{figure['ratio']:.2f}× [{figure['ci'][0]:+.3g}, {figure['ci'][1]:+.3g}]"
            + ("" if figure["significant"] else " n.s."))


def leaderboard_table(rows: list[dict], plain_shown: int = 4) -> None:
    """Per NFE: the best `plain_shown` plain configurations (by distribution gap) and timetuner's variants."""
    print("| NFE | method | distribution gap | x0 gap | data FD | dist. gap vs best plain [95 % CI of the change] | "
          "x0 gap vs best plain | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for nfe in sorted({r["nfe"] for r in rows}):
        at = [r for r in rows if r["nfe"] == nfe]
        if all(r["kind"] == "plain" for r in at):
            continue  # a run cut short before timetuner's variants: not a comparison
        plain = sorted((r for r in at if r["kind"] == "plain"), key=lambda r: r["dist_gap"])
        shown = plain[:plain_shown] + sorted((r for r in at if r["kind"] != "plain"), key=lambda r: r["dist_gap"])
        for r in shown:
            name = f"plain {r['method']}" if r["kind"] == "plain" else f"**timetuner {r['method']}**"
            if r["kind"] == "plain" and r["method"] == r["best_plain"]:
                name += " (best plain)"
            vs = r.get("vs_best_plain", {})
            fd = r.get("data_fd", float("nan"))
            print(f"| {nfe} | {name} | {r['dist_gap']:.2f} | {r['x0_gap']:.4f} | {fd:.2f} | "
                  f"{_versus(vs.get('dist_gap'))} | {_versus(vs.get('x0_gap'))} | {r.get('fit_seconds', '')} |")
        print(f"| {nfe} | ({len(plain)} plain configurations in all) | | | | | | |")


def main(paths: list[str]) -> None:
    records = [json.loads(line) for path in paths for line in open(path) if line.strip().startswith("{")]
    by = {}
    for r in records:
        by.setdefault(r["figure"], []).append(r)
    if "quality" in by:
        quality_table(by["quality"])
        gap_nfe_figure(by["quality"])
    if "leaderboard" in by:
        leaderboard_table(by["leaderboard"])
    if "optimizer" in by:
        print()
        optimizer_table(by["optimizer"])
    if "speedup" in by or "overhead" in by:
        print()
        train_tables(by.get("speedup", []), by.get("overhead", []), by.get("draw_cost", []))
    for r in records:
        if r["figure"] in ("default_fit", "sampling_time", "machine", "paired", "floor", "subsets", "sampler",
                           "floor_train_vs_test", "forward_256_seconds"):
            print(f"\n`{json.dumps(r)}`")


if __name__ == "__main__":
    main(sys.argv[1:])
