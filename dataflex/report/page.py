"""The results page of a sweep: report.md (tables, the headline ratio, the figures) and report.csv (the same
numbers, unrounded), from strategies grouped by `runs.group_runs` and measured by `stats.summarize`."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

from dataflex.report import plots
from dataflex.report.runs import Strategy
from dataflex.report.stats import (
    NAN,
    Reference,
    StrategyStats,
    best_dynamic,
    domains_of,
    mean_std,
    summarize,
    tasks_of,
)

ODM_RATIO = 0.81   # ODM (Albalak et al., 2023): steps to the uniform baseline's final perplexity on the Pile


def pm(value: tuple, digits: int = 3) -> str:
    mean, std = value
    if mean is None or not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def reach_cell(s: StrategyStats, digits: int = 0) -> str:
    hits = [r for r in s.reach if r is not None]
    if not hits:
        return f"— (0/{len(s.reach)})"
    return f"{pm(mean_std(hits), digits)} ({len(hits)}/{len(s.reach)})"


def headline(stats: list, ref: Reference) -> str:
    """The best dynamic strategy's steps to the baseline's final mean validation loss, as a ratio with its spread."""
    best = best_dynamic(stats, ref.label)
    if best is None:
        dynamic = [s for s in stats if s.dynamic and s.label != ref.label]
        what = "No dynamic strategy" if dynamic else "No dynamic strategy (mixer other than static, selector or " \
            "reweighter) is in this sweep, so none"
        return (f"{what} reaches the baseline's final mean validation loss ({ref.final_mean:.3f}) within its run "
                f"(ODM reports {ODM_RATIO:.2f}x the steps on the Pile).")
    return (f"Best dynamic strategy: **{best.label}** reaches the baseline's final mean validation loss "
            f"({ref.final_mean:.3f}) in **{pm(best.ratio, 2)}x** the baseline's steps (mean ± std over the "
            f"{best.reached}/{len(best.reach)} seeds that reach it; ODM reports {ODM_RATIO:.2f}x on the Pile).")


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows])


def loss_table(stats: list, domains: list, baseline: str) -> str:
    has_target = any(s.target for s in stats)
    tasks = list(dict.fromkeys(t for s in stats for t in s.tasks))
    header = ["strategy", "seeds", *domains, "mean"] + (["target"] if has_target else []) + \
        [f"target: {t}" for t in tasks]
    rows = []
    for s in stats:
        name = f"**{s.label}** (baseline)" if s.label == baseline else s.label
        rows.append([name, len(s.seeds), *[pm(s.domains[d]) for d in domains], pm(s.mean)]
                    + ([pm(s.target) if s.target else "—"] if has_target else [])
                    + [pm(s.tasks.get(t, (NAN, NAN))) for t in tasks])
    return _table(header, rows)


def cost_table(stats: list, ref: Reference) -> str:
    header = ["strategy", "steps to baseline's final (seeds)", "x baseline steps", "tokens to baseline's final",
              "wall time s", "s / step", "overhead / step"]
    rows = []
    for s in stats:
        tokens = "—" if not math.isfinite(s.tokens[0]) else f"{s.tokens[0]:,.0f} ± {s.tokens[1]:,.0f}"
        overhead = f"{s.overhead:.2f}x" if math.isfinite(s.overhead) else "—"
        sps = f"{s.sec_per_step:.3f}" if math.isfinite(s.sec_per_step) else "—"
        rows.append([s.label, reach_cell(s), pm(s.ratio, 2), tokens, pm(s.wall, 1), sps, overhead])
    return _table(header, rows)


def csv_rows(stats: list, domains: list, ref: Reference, tasks: list = ()) -> list:
    header = ["strategy", "seeds", "dynamic"] + [f"val_{d}_{k}" for d in domains for k in ("mean", "std")] + \
        ["val_mean_mean", "val_mean_std", "target_mean", "target_std"] + \
        [f"target_{t}_{k}" for t in tasks for k in ("mean", "std")] + ["reached", "steps_to_baseline_mean",
         "steps_to_baseline_std", "ratio_mean", "ratio_std", "tokens_to_baseline_mean", "tokens_to_baseline_std",
         "wall_s_mean", "wall_s_std", "sec_per_step", "overhead", "baseline", "baseline_final_mean", "baseline_steps"]
    rows = [header]
    for s in stats:
        hits = [r for r in s.reach if r is not None]
        rows.append([s.label, len(s.seeds), s.dynamic] + [x for d in domains for x in s.domains[d]]
                    + [*s.mean, *(s.target or ("", ""))] + [x for t in tasks for x in s.tasks.get(t, ("", ""))]
                    + [s.reached, *mean_std(hits), *s.ratio, *s.tokens, *s.wall,
                       s.sec_per_step, s.overhead, ref.label, ref.final_mean, ref.steps])
    return rows


def write_report(root: Path, strategies: list, baseline: Strategy, out: Optional[Path] = None) -> dict:
    """report.md, report.csv and the figures in `out` (default `root`); returns {name: path} of what it wrote."""
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    ref, stats = summarize(strategies, baseline)
    domains = domains_of(strategies)
    colour = plots.colours(s.label for s in strategies)
    figures = {
        "validation curves": plots.validation_curves(strategies, out / "val_curves.png", colour, ref.final_mean,
                                                     domains),
        "domain weights": plots.domain_weights(strategies, out / "domain_weights.png", colour),
        "sample weights": plots.sample_weights(strategies, out / "sample_weights.png", colour),
        "selection rates": plots.selection_rates(strategies, out / "selection_rates.png", colour),
    }
    captions = {
        "validation curves": "Validation loss over steps (mean over seeds, band: min..max over seeds; dotted: "
                             "the baseline's final mean).",
        "domain weights": "Domain weights over steps, one panel per domain, for every strategy with a mixer "
                          "(mean over seeds, band: min..max).",
        "sample weights": "Per-sample weights of the kept samples, from the ledger (all steps and seeds).",
        "selection rates": "Fraction of each domain the selector kept: of the domain's pool for pool selectors "
                           "(their kept counts), of its candidates for batch selectors (the ledger); mean over "
                           "seeds, error bar: std.",
    }
    runs, seeds = sum(len(s.runs) for s in strategies), len(baseline.runs)
    count = f"{len(strategies)} strateg{'y' if len(strategies) == 1 else 'ies'}, {runs} run{'s' * (runs != 1)}"
    lines = [f"# Results: {root}", "",
             f"{count}. Baseline: **{ref.label}** (final mean validation loss {ref.final_mean:.3f}, averaged over "
             f"its {seeds} seed{'s' * (seeds != 1)}; {ref.steps:.0f} steps). "
             "Values are mean ± std over seeds (sample standard deviation; 0 for one seed).", "",
             headline(stats, ref), "",
             "## Final validation loss", "", loss_table(stats, domains, ref.label), "",
             "## Steps, tokens and time to the baseline's final mean validation loss", "",
             "First evaluation at which a run's mean validation loss is at or below the baseline's final mean; "
             "`x baseline steps` is that step over the baseline's run length, over the seeds that reach it. "
             "Wall time includes start-up and evaluations; overhead is s/step (median over seeds) over the "
             "baseline's.", "", cost_table(stats, ref), ""]
    lines += ["## Figures", ""]
    for name, path in figures.items():
        if path is not None:
            lines += [f"![{name}]({path.name})", "", captions[name], ""]
    skipped = [name for name, path in figures.items() if path is None]
    if skipped:
        lines += [f"Not drawn (no strategy has the data): {', '.join(skipped)}.", ""]
    (out / "report.md").write_text("\n".join(lines))
    with open(out / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows(stats, domains, ref, tasks_of(strategies)))
    written = {"report.md": out / "report.md", "report.csv": out / "report.csv"}
    written.update({p.name: p for p in figures.values() if p is not None})
    return {"files": written, "stats": stats, "reference": ref, "markdown": "\n".join(lines)}
