"""Compare finished runs: one table (markdown + CSV) and one plot for a sweep or a folder of runs.

    python launch/compare.py multirun/2026-11-23/12-00-00      # after `launch/train.py -m ...`
    python launch/compare.py outputs/demo

Every folder below DIR holding a summary.json is a run. Writes DIR/comparison.{md,csv,png}.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataflex.outputs import strategy_label  # noqa: E402


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


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(runs[0]["summary"]["domain_weights"] or {})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        val = r["summary"]["val_loss"] or {}
        axes[0].bar([j + i * width for j in range(len(domains))], [val.get(d, 0) for d in domains], width, label=r["name"])
        steps = [h for h in r["history"] if "domain_weights" in h]
        for j, d in enumerate(domains):   # colour = domain, line style = run
            axes[1].plot([h["step"] for h in steps], [h["domain_weights"][d] for h in steps], color=f"C{j}",
                         label=f"{r['name']}: {d}", linestyle=["-", "--", ":", "-."][i % 4])
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    axes[0].set(ylabel="final validation loss", title="per-domain validation loss")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="step", ylabel="domain weight", title="domain weights")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    args = ap.parse_args(argv)
    if not args.dir.is_dir():
        sys.exit(f"compare: no such folder: {args.dir}")
    runs = load_runs(args.dir)
    if not runs:
        sys.exit(f"compare: no finished run (summary.json) under {args.dir}")
    header, rows = table(runs)
    md = markdown(header, rows)
    (args.dir / "comparison.md").write_text(md + "\n")
    with open(args.dir / "comparison.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    plot(runs, args.dir / "comparison.png")
    print(md)
    print(f"\nwrote {args.dir / 'comparison.md'}, comparison.csv, comparison.png")


if __name__ == "__main__":
    main()
