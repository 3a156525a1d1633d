"""From a sweep folder to one results page: `launch/compare.py SWEEP_DIR`.

runs.py groups finished runs into strategies (config minus the seed), stats.py measures them against a
baseline (95% intervals over seeds, differences paired by seed, verdicts, seed spreads), plots.py draws the
figures, page.py writes report.md and report.csv; comparison.py keeps the
per-run side-by-side table (comparison.md/csv/png) that `make demo` prints.
"""
from dataflex.report.page import write_report
from dataflex.report.runs import find_runs, group_runs, pick_baseline

__all__ = ["find_runs", "group_runs", "pick_baseline", "write_report"]
