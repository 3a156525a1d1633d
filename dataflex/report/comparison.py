"""The side-by-side view of a folder of runs (one row and one bar per run, no seed grouping):
DIR/comparison.{md,csv,png}, which `make demo` prints. The per-strategy page over seeds is `page.py`."""
import csv
import json
from pathlib import Path

from dataflex.run.outputs import strategy_label


def load_runs(root: Path) -> list[dict]:
    runs = []
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        metrics = path.parent / "metrics.jsonl"
        history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        runs.append({"dir": path.parent, "name": strategy_label(summary["strategy"]), "summary": summary,
                     "history": history})
    return runs


def table(runs: list[dict]) -> tuple[list[str], list[list]]:
    domains = list(runs[0]["summary"]["domain_weights"] or {})
    header = ["run", "steps", "wall s", "mean val loss"] + [f"val {d}" for d in domains] + [f"w {d}" for d in domains]
    rows = []
    for r in runs:
        s = r["summary"]
        val = s["val_loss"] or {}
        mean = sum(val.values()) / len(val) if val else float("nan")
        rows.append([r["name"], s["steps"], round(s["wall_time_s"], 1), round(mean, 4)]
                    + [round(val.get(d, float("nan")), 4) for d in domains]
                    + [round((s["domain_weights"] or {}).get(d, float("nan")), 3) for d in domains])
    return header, sorted(rows, key=lambda row: row[3])


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]


def figure(runs: list[dict]):
    """Left: final validation loss, one small panel per domain with its own zoomed axis (differences of a
    few hundredths show) and the values written on the bars. Right: domain weights over steps,
    colour = domain, line style + marker = run (later runs drawn thinner on top, markers offset), so
    identical lines stay distinguishable; legends sit outside the curves."""
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False     # domain names are text: `$x$` is not TeX
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    RUN_COLOURS = matplotlib.colormaps["Dark2"]   # runs; the domain colours (C0, C1, ...) stay for domains
    domains = list(runs[0]["summary"]["domain_weights"] or {})
    fig = plt.figure(figsize=(15, 4.8))
    outer = fig.add_gridspec(1, 2, width_ratios=[1.1, 1.25], wspace=0.18)
    left = outer[0].subgridspec(1, max(1, len(domains)), wspace=0.55)
    bar_axes = [fig.add_subplot(left[0, j]) for j in range(len(domains))]
    for j, (ax, d) in enumerate(zip(bar_axes, domains)):
        heights = [(r["summary"]["val_loss"] or {}).get(d, float("nan")) for r in runs]
        bars = ax.bar(range(len(runs)), heights, 0.8, color=[RUN_COLOURS(i % 8) for i in range(len(runs))])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2, rotation=90 if len(runs) > 3 else 0)
        finite = [h for h in heights if h == h]
        if finite:  # zoomed on this domain's values: the axis does not start at 0
            lo, hi = min(finite), max(finite)
            pad = max(hi - lo, 0.02 * abs(hi), 1e-3)
            ax.set_ylim(lo - 0.6 * pad, hi + 0.6 * pad)
        ax.set_xticks([])
        ax.set_title(d, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    if bar_axes:
        bar_axes[0].set_ylabel("final validation loss (zoomed)")
        fig.legend([plt.Rectangle((0, 0), 1, 1, color=RUN_COLOURS(i % 8)) for i in range(len(runs))],
                   [r["name"] for r in runs], loc="lower left", bbox_to_anchor=(0.04, -0.02),
                   ncol=min(len(runs), 3), fontsize=8, frameon=False)
    ax = fig.add_subplot(outer[1])
    for i, r in enumerate(runs):
        steps = [h for h in r["history"] if "domain_weights" in h]
        every = max(1, len(steps) // 8)
        for j, d in enumerate(domains):   # colour = domain, line style + marker = run
            ax.plot([h["step"] for h in steps], [h["domain_weights"][d] for h in steps], color=f"C{j}",
                    linestyle=STYLES[i % len(STYLES)], linewidth=max(0.9, 2.6 - 0.8 * i),
                    marker=MARKERS[i % len(MARKERS)], markersize=4, markevery=(i * every // len(runs), every),
                    label=f"{r['name']}: {d}", zorder=2 + i)
    ax.set(xlabel="step", ylabel="domain weight", title="domain weights")
    by_domain = [Line2D([], [], color=f"C{j}", linewidth=2) for j in range(len(domains))]
    by_run = [Line2D([], [], color="black", linestyle=STYLES[i % len(STYLES)], marker=MARKERS[i % len(MARKERS)],
                     linewidth=max(0.9, 2.6 - 0.8 * i)) for i in range(len(runs))]
    first = ax.legend(by_domain, domains, title="domain", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.add_artist(first)
    ax.legend(by_run, [r["name"] for r in runs], title="run", fontsize=8, loc="lower left", bbox_to_anchor=(1.01, 0))
    fig.subplots_adjust(left=0.05, right=0.88, bottom=0.16, top=0.9)
    return fig


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(runs)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write(runs: list[dict], folder: Path) -> str:
    """comparison.md, comparison.csv and comparison.png in `folder`; returns the markdown table."""
    header, rows = table(runs)
    md = markdown(header, rows)
    (folder / "comparison.md").write_text(md + "\n")
    with open(folder / "comparison.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    plot(runs, folder / "comparison.png")
    return md
