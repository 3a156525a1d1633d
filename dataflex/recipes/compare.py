"""Compare finished runs: one results page for a sweep or a folder of runs.

    python launch/compare.py multirun/2026-11-23/12-00-00      # after `launch/train.py -m ... trainer.seed=0,1,2`
    python launch/compare.py multirun/sweeps/mixers            # bench/sweeps.py's layout: vI/SEED per strategy
    python launch/compare.py outputs/demo --baseline mixer=static --out results/

Every folder below DIR holding a summary.json is a run; runs whose overrides differ only in trainer.seed are
one strategy. Writes, in --out (default DIR): report.md (per strategy and metric (per-domain, mean and target
validation loss) the mean over seeds with its 95% interval, the difference from the baseline paired by seed
with its interval and a verdict: better / worse / within noise; each strategy's seed spread against the
baseline's; steps and tokens to the baseline's final mean validation loss with the seeds that reach it; wall
time and overhead per step; the figures), report.csv (with the interval bounds), val_curves.png, domain_weights.png, sample_weights.png,
selection_rates.png (each when some strategy has the data), and the per-run comparison.{md,csv,png}.
The baseline (--baseline LABEL, exact or a unique part of it) defaults to the static uniform mixture, else
the run without plugins, else the first strategy.
"""
import argparse
import sys
from pathlib import Path

from dataflex.report import find_runs, group_runs, pick_baseline, write_report  # noqa: E402

# the per-run table and figure, also used as compare.figure / compare.table
from dataflex.report.comparison import figure, load_runs, markdown, plot, table, write  # noqa: E402,F401


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="a sweep folder, or any folder of runs")
    ap.add_argument("--baseline", help="the strategy every other is measured against (its label, or part of it)")
    ap.add_argument("--out", type=Path, help="where the page goes (default: DIR)")
    ap.add_argument("--interval", choices=("t", "bootstrap"), default="t",
                    help="intervals over seeds: Student's t (default) or a seeded percentile bootstrap")
    ap.add_argument("--level", type=float, default=0.95, help="the intervals' confidence level (default 0.95)")
    ap.add_argument("--correction", choices=("bonferroni", "none"), default="bonferroni",
                    help="the differences from the baseline: Bonferroni-corrected over the strategies compared "
                         "(default; all verdicts of a metric hold together at --level) or each at --level")
    args = ap.parse_args(argv)
    if not args.dir.is_dir():
        sys.exit(f"compare: no such folder: {args.dir}")
    runs = find_runs(args.dir)
    if not runs:
        sys.exit(f"compare: no finished run (summary.json) under {args.dir}")
    out = args.out or args.dir
    out.mkdir(parents=True, exist_ok=True)
    strategies = group_runs(runs)
    try:
        baseline = pick_baseline(strategies, args.baseline)
    except ValueError as e:
        sys.exit(f"compare: {e}")
    if not 0 < args.level < 1:
        sys.exit(f"compare: --level must be in (0, 1), got {args.level}")
    page = write_report(args.dir, strategies, baseline, out, args.level, args.interval, args.correction)
    md = write(load_runs(args.dir), out)
    print(md)
    print("\n" + page["markdown"].split("## Figures")[0].strip())
    print(f"\nwrote {out / 'comparison.md'}, comparison.csv, comparison.png")
    print(f"wrote {out / 'report.md'}: " + ", ".join(sorted(p.name for p in page["files"].values())))


if __name__ == "__main__":
    main()
