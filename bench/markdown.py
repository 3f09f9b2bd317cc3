"""Render the JSON lines of bench/fit.py, bench/solvers.py and bench/train.py --overhead as the Markdown tables of
docs/results.md.

    python bench/fit.py | tee fit.jsonl && python bench/markdown.py fit.jsonl
    python bench/train.py --overhead | tee overhead.jsonl && python bench/markdown.py overhead.jsonl
    python bench/markdown.py bench/results/solvers.jsonl          # the leaderboard (bench/solvers.py)
    python bench/markdown.py bench/results/solvers-budget.jsonl   # with the cheaper fits' table
"""

from __future__ import annotations

import json
import sys

from timetuner.measuring import markdown_table


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
    print(f"(means over {sets} held-out noise sets)")
    print(markdown_table(
        ["solver", "grid", "NFE", "objective", "distribution gap plain → tuned", "x0 gap plain → tuned",
         "data FD plain → tuned (secondary)", "verdict", "fit s"],
        [[r["scheduler"], r["trajectory"], str(r["nfe"]), r["objective"], _cell(r.get("dist_gap"), 2),
          _cell(r.get("x0_gap"), 4), _cell(r.get("data_fd"), 2), "better" if r["better"] else "**not better**",
          str(r["fit_seconds"])] for r in quality]))


def gap_nfe_figure(quality: list[dict], path: str = "bench/results/gap_vs_nfe.png", objective: str = "e2e") -> None:
    """Distribution gap against NFE, plain and tuned, one panel per solver/grid, from the quality rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from timetuner.measuring import draw_nfe_curve, save_figure

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
    print(markdown_table(
        ["optimiser", "fit network evaluations", "all evaluations (incl. held-out check)", "wall s",
         "held-out paper loss plain → tuned", "held-out x0 gap plain → tuned"],
        [[f"{r['optimizer']}{' (' + str(r['adam_iters']) + ' it/τ)' if r['adam_iters'] else ''}",
          f"{r['fit_network_evaluations']:,}", f"{r['network_evaluations']:,}", str(r["seconds"]),
          f"{r['held_out_paper_loss_plain']:.4f} → {r['held_out_paper_loss_tuned']:.4f}",
          f"{r['gap_plain']:.4f} → {r['gap_tuned']:.4f}"] for r in rows]))
    if len(rows) == 2:
        search, adam = rows
        fit_ratio = adam["fit_network_evaluations"] / search["fit_network_evaluations"]
        all_ratio = adam["network_evaluations"] / search["network_evaluations"]
        print(f"\nsearch uses 1/{fit_ratio:.1f} of adam's fit evaluations (1/{all_ratio:.1f} counting the held-out "
              "check both share).")


def overhead_table(overhead: list[dict], draw: list[dict]) -> None:
    """bench/train.py --overhead's lines (its speed-up tables: `bench/train.py --report --markdown`)."""
    cost = {r["method"]: r["ms_per_step"] for r in draw}
    print(markdown_table(["method", "seconds / training step", "overhead vs uniform", "draw + weight alone, ms / step"],
                         [[r["method"], f"{r['seconds_per_step']:.4f}", f"{r['overhead_pct']:+.1f} %",
                           str(cost.get(r["method"], "—"))] for r in overhead]))


def _versus(figure: dict | None) -> str:
    """ratio to the best plain configuration [95 % interval of the change, relative]; "n.s." when it covers 0."""
    if figure is None:
        return "—"
    return (f"{figure['ratio']:.2f}× [{figure['ci'][0]:+.3g}, {figure['ci'][1]:+.3g}]"
            + ("" if figure["significant"] else " n.s."))


def leaderboard_table(rows: list[dict], plain_shown: int = 4) -> None:
    """Per NFE: the best `plain_shown` plain configurations (by distribution gap) and timetuner's variants."""
    cells = []
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
            cells.append([str(nfe), name, f"{r['dist_gap']:.2f}", f"{r['x0_gap']:.4f}",
                          f"{r.get('data_fd', float('nan')):.2f}", _versus(vs.get("dist_gap")),
                          _versus(vs.get("x0_gap")), str(r.get("fit_seconds", ""))])
        cells.append([str(nfe), f"({len(plain)} plain configurations in all)", *[""] * 6])
    print(markdown_table(["NFE", "method", "distribution gap", "x0 gap", "data FD",
                          "dist. gap vs best plain [95 % CI of the change]", "x0 gap vs best plain", "fit s"], cells))


def budget_table(rows: list[dict], base: str = "auto") -> None:
    """bench/solvers.py's cheaper fits (`--variants auto,auto-s64,…`): per NFE each fit's cost, its figures against
    the best plain configuration, and the paired change of its x0 and distribution gaps against `base` over the
    held-out sets (95 % Student-t interval of the mean per-set difference)."""
    from timetuner.measuring import t_interval

    cells = []
    for nfe in sorted({r["nfe"] for r in rows}, reverse=True):
        tuned = {r["method"]: r for r in rows if r["nfe"] == nfe and r["kind"] == "timetuner"}
        if base not in tuned:
            continue
        for name, r in tuned.items():
            vs, against = r["vs_best_plain"], []
            for key, digits in (("x0_gap", 4), ("dist_gap", 2)):
                if name == base:
                    against.append("—")
                    continue
                diff = [c - b for b, c in zip(tuned[base]["vs_best_plain"][key]["per_set"], vs[key]["per_set"],
                                              strict=True)]
                low, high = t_interval(diff)
                against.append(f"{sum(diff) / len(diff):+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
                               + ("" if low > 0 or high < 0 else " n.s."))
            cells.append([str(nfe), name, r.get("auto_winner", "—"), f"{r['fit_seconds']}",
                          f"{r['x0_gap']:.4f}", _versus(vs["x0_gap"]), f"{r['dist_gap']:.2f}",
                          _versus(vs["dist_gap"]), *against])
    print(markdown_table(["NFE", "fit", "shipped", "fit s", "x0 gap", "vs best plain", "dist. gap", "vs best plain",
                          f"x0 gap − {base}'s", f"dist. gap − {base}'s"], cells))


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
        if any(r["method"].startswith("auto-") and r["method"] != "auto-tau" for r in by["leaderboard"]):
            print()
            budget_table([r for r in by["leaderboard"] if r["method"].startswith("auto")])
    if "optimizer" in by:
        print()
        optimizer_table(by["optimizer"])
    if "overhead" in by:
        print()
        overhead_table(by["overhead"], by.get("draw_cost", []))
    for r in records:
        if r["figure"] in ("default_fit", "sampling_time", "machine", "paired", "floor", "subsets", "sampler",
                           "floor_train_vs_test", "forward_256_seconds"):
            print(f"\n`{json.dumps(r)}`")


if __name__ == "__main__":
    main(sys.argv[1:])
