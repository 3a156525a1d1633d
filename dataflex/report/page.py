"""The results page of a sweep: report.md (the verdicts against the baseline, paired by seed; the seed spread;
the losses with their 95% intervals; steps to the baseline's final loss; the figures) and report.csv (the same
numbers, unrounded, interval bounds included), from strategies grouped by `runs.group_runs` and measured by
`stats.summarize`. docs/guides/comparing-runs-statistics.md explains every number."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

from dataflex.report import plots
from dataflex.report.runs import Strategy, cost_mismatch
from dataflex.report.stats import (
    LEVEL,
    NAN,
    SPREAD_FLAG,
    Interval,
    Reference,
    StrategyStats,
    best_dynamic,
    comparison_level,
    domains_of,
    mean_std,
    metric_names,
    spread_flag,
    summarize,
    tasks_of,
)

ODM_RATIO = 0.81   # ODM (Albalak et al., 2023): steps to the uniform baseline's final perplexity on the Pile


def pm(value: tuple, digits: int = 3) -> str:
    mean, std = value
    if mean is None or not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def num(x: float, digits: int = 3, sign: bool = False) -> str:
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def ci_cell(iv: Interval, digits: int = 3, sign: bool = False) -> str:
    """`mean [lo, hi]`; `mean (1 seed)` without an interval; — without a value."""
    if iv.n == 0 and iv.method != "welch" or not math.isfinite(iv.mean):
        return "—"
    if not iv.has_interval:
        return f"{num(iv.mean, digits, sign)} (1 seed)"
    return f"{num(iv.mean, digits, sign)} [{num(iv.lo, digits, sign)}, {num(iv.hi, digits, sign)}]"


def diff_cell(iv: Interval, digits: int = 3) -> str:
    """The paired difference `d [lo, hi]`; marked `unpaired` where it fell back to Welch's interval."""
    if not math.isfinite(iv.mean):
        return "—"
    if not iv.has_interval:
        return f"{num(iv.mean, digits, True)} (no interval)"
    return ci_cell(iv, digits, sign=True) + (" unpaired" if iv.method == "welch" else "")


def pairs(iv: Interval) -> str:
    return "unpaired" if iv.method == "welch" else str(iv.n)


def reach_cell(s: StrategyStats, digits: int = 0) -> str:
    """Steps to the baseline's final mean: mean [95% interval] over the seeds that reach it (k/n)."""
    hits = [r for r in s.reach if r is not None]
    if not hits:
        return f"— (0/{len(s.reach)})"
    return f"{ci_cell(s.reach_ci, digits)} ({len(hits)}/{len(s.reach)})"


def headline(stats: list, ref: Reference) -> str:
    """The best dynamic strategy's steps to the baseline's final mean validation loss, as a ratio with its spread."""
    best = best_dynamic(stats, ref.label)
    if best is None:
        dynamic = [s for s in stats if s.dynamic and s.label != ref.label]
        what = "No dynamic strategy" if dynamic else "No dynamic strategy (mixer other than static, selector or " \
            "reweighter) is in this sweep, so none"
        return (f"{what} reaches the baseline's final mean validation loss ({ref.final_mean:.3f}) within its run "
                f"(ODM reports {ODM_RATIO:.2f}x the steps on the Pile).")
    iv = f", 95% interval {best.ratio_ci.lo:.2f}..{best.ratio_ci.hi:.2f}x" if best.ratio_ci.has_interval else ""
    return (f"Best dynamic strategy: **{best.label}** reaches the baseline's final mean validation loss "
            f"({ref.final_mean:.3f}) in **{pm(best.ratio, 2)}x** the baseline's steps (mean ± std over the "
            f"{best.reached}/{len(best.reach)} seeds that reach it{iv}; ODM reports {ODM_RATIO:.2f}x on the Pile). "
            f"Whether it ends better than the baseline is its verdict below.")


def verdict_summary(stats: list, metric: str, name: str) -> str:
    """One sentence: which strategies are better / worse than the baseline beyond noise on `metric`."""
    groups: dict = {}
    for s in stats:
        if not s.is_baseline and metric in s.verdicts:
            groups.setdefault(s.verdicts[metric], []).append(s.label)
    if not groups:
        return ""
    parts = [f"{what}: {', '.join(groups[what])}" for what in ("better", "worse", "within noise", "too few seeds")
             if groups.get(what)]
    return f"On the {name}, against the baseline, paired by seed: " + "; ".join(parts) + "."


def versus_table(stats: list, metrics: list, names: dict) -> str:
    """Per strategy: seeds, and for each headline metric its mean [95%], the paired difference [95%], the verdict."""
    header = ["strategy", "seeds (pairs)"]
    for m in metrics:
        header += [f"{names[m]} [95%]", "− baseline [95%]", "verdict"]
    rows = []
    for s in stats:
        first = s.diff.get(metrics[0], Interval(NAN, NAN, NAN, 0, NAN, "none"))
        row = [f"**{s.label}** (baseline)" if s.is_baseline else s.label,
               f"{len(s.seeds)}" + ("" if s.is_baseline else f" ({pairs(first)})")]
        for m in metrics:
            if m not in s.ci:
                row += ["—", "—", "—"]
                continue
            if s.is_baseline or m not in s.diff:
                row += [ci_cell(s.ci[m]), "—", "baseline" if s.is_baseline else "the baseline has none"]
                continue
            v = s.verdicts[m]
            row += [ci_cell(s.ci[m]), diff_cell(s.diff[m]), f"**{v}**" if v in ("better", "worse") else v]
        rows.append(row)
    return _table(header, rows)


def noise_table(stats: list) -> tuple:
    """(table, [flagged labels]): per strategy the seed std of its mean validation loss, and that std over the
    baseline's with the F interval."""
    header = ["strategy", "seeds", "seed std (mean val loss)", "std / baseline's std [95%]", "flag"]
    rows, flagged = [], []
    for s in stats:
        ratio, lo, hi = s.spread
        std = s.ci.get("val_mean", Interval(NAN, NAN, NAN, 0, NAN, "none")).std
        flag = "" if s.is_baseline else spread_flag(ratio)
        if flag:
            flagged.append(f"{s.label} ({flag})")
        cell = "—" if not math.isfinite(ratio) else f"{ratio:.2f} [{lo:.2f}, {hi:.2f}]"
        rows.append([f"**{s.label}** (baseline)" if s.is_baseline else s.label, len(s.seeds),
                     f"{std:.4f}" if math.isfinite(std) else "—", "1" if s.is_baseline else cell, flag])
    return _table(header, rows), flagged


def diff_table(stats: list, metrics: list, names: dict) -> str:
    """Every metric: the paired difference from the baseline [95%] and its verdict, one column per metric."""
    header = ["strategy"] + [names[m] for m in metrics]
    rows = []
    for s in stats:
        if s.is_baseline:
            continue
        rows.append([s.label] + ["—" if m not in s.diff else f"{diff_cell(s.diff[m])} {s.verdicts[m]}"
                                 for m in metrics])
    return _table(header, rows)


def md_text(x) -> str:
    """Text from a run (a domain name, a strategy label, a path) made inert in Markdown: HTML escaped (`<`,
    `>`, `&`), no line breaks."""
    import html

    return html.escape(str(x), quote=False).replace("\r", " ").replace("\n", " ")


def md_cell(x) -> str:
    """One table cell: md_text, and `|` escaped so a name holding one stays in its column."""
    return md_text(x).replace("|", "\\|")


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(md_cell(x) for x in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(md_cell(x) for x in row) + " |" for row in rows])


def loss_table(stats: list, domains: list, baseline: str) -> str:
    has_target = any(s.target for s in stats)
    tasks = list(dict.fromkeys(t for s in stats for t in s.tasks))
    header = ["strategy", "seeds", *domains, "mean"] + (["target"] if has_target else []) + \
        [f"target: {t}" for t in tasks]
    rows = []
    for s in stats:
        name = f"**{s.label}** (baseline)" if s.label == baseline else s.label
        cell = (lambda key: ci_cell(s.ci[key]) if key in s.ci else "—")
        rows.append([name, len(s.seeds), *[cell(f"val_{d}") for d in domains], cell("val_mean")]
                    + ([cell("target")] if has_target else [])
                    + [cell(f"target_{t}") for t in tasks])
    return _table(header, rows)


def cost_table(stats: list, ref: Reference, with_time: bool = True) -> str:
    """Steps and tokens to the baseline's final loss; wall time, s/step and overhead only when `with_time`
    (the runs were made alike: `runs.cost_mismatch` is empty)."""
    header = ["strategy", "steps to baseline's final (seeds)", "x baseline steps", "tokens to baseline's final"]
    header += ["wall time s", "s / step", "overhead / step"] if with_time else []
    rows = []
    for s in stats:
        tokens = "—" if not math.isfinite(s.tokens[0]) else f"{s.tokens[0]:,.0f} ± {s.tokens[1]:,.0f}"
        overhead = f"{s.overhead:.2f}x" if math.isfinite(s.overhead) else "—"
        sps = f"{s.sec_per_step:.3f}" if math.isfinite(s.sec_per_step) else "—"
        rows.append([s.label, reach_cell(s), pm(s.ratio, 2), tokens] + ([pm(s.wall, 1), sps, overhead]
                                                                        if with_time else []))
    return _table(header, rows)


def cost_sentence(mismatch: list) -> str:
    if not mismatch:
        return ("Wall time includes start-up and evaluations; overhead is s/step (median over seeds) over the "
                "baseline's. The runs were made alike (logger, back end, ranks, evaluation settings, batch, "
                "sequence length, machine).")
    return ("Wall time is not compared here: the runs were not made alike (" + "; ".join(mismatch) + "), and "
            "that costs time that is not the strategy's. The controlled step-time comparison is "
            "docs/benchmarks.md (`make bench`).")


def csv_rows(stats: list, domains: list, ref: Reference, tasks: list = (), metrics: list = (), level: float = LEVEL,
             method: str = "t", diff_level: Optional[float] = None, comparable: bool = True) -> list:
    """report.csv: the page's numbers unrounded; for every metric KEY (val_mean, val_DOMAIN, target,
    target_TASK): KEY_lo/KEY_hi (the interval of its mean), KEY_diff/KEY_diff_lo/KEY_diff_hi (paired by seed
    with the baseline), KEY_pairs (seeds paired; 0: Welch's unpaired interval) and KEY_verdict."""
    header = ["strategy", "seeds", "dynamic"] + [f"val_{d}_{k}" for d in domains for k in ("mean", "std")] + \
        ["val_mean_mean", "val_mean_std", "target_mean", "target_std"] + \
        [f"target_{t}_{k}" for t in tasks for k in ("mean", "std")] + ["reached", "steps_to_baseline_mean",
         "steps_to_baseline_std", "ratio_mean", "ratio_std", "tokens_to_baseline_mean", "tokens_to_baseline_std",
         "wall_s_mean", "wall_s_std", "sec_per_step", "overhead", "baseline", "baseline_final_mean", "baseline_steps"]
    header += ["interval", "level", "steps_to_baseline_lo", "steps_to_baseline_hi", "ratio_lo", "ratio_hi",
               "spread_ratio", "spread_ratio_lo", "spread_ratio_hi", "diff_level", "cost_comparable"]
    header += [f"{m}_{k}" for m in metrics for k in ("lo", "hi", "diff", "diff_lo", "diff_hi", "pairs", "verdict")]
    rows = [header]
    for s in stats:
        hits = [r for r in s.reach if r is not None]
        row = [s.label, len(s.seeds), s.dynamic] + [x for d in domains for x in s.domains[d]] \
            + [*s.mean, *(s.target or ("", ""))] + [x for t in tasks for x in s.tasks.get(t, ("", ""))] \
            + [s.reached, *mean_std(hits), *s.ratio, *s.tokens, *s.wall,
               s.sec_per_step, s.overhead, ref.label, ref.final_mean, ref.steps]
        row += [method, level, s.reach_ci.lo, s.reach_ci.hi, s.ratio_ci.lo, s.ratio_ci.hi, *s.spread,
                diff_level if diff_level is not None else level, comparable]
        for m in metrics:
            ci, diff = s.ci.get(m), s.diff.get(m)
            row += [ci.lo, ci.hi] if ci else ["", ""]
            row += [diff.mean, diff.lo, diff.hi, diff.n, s.verdicts[m]] if diff else ["", "", "", "", ""]
        rows.append(row)
    return rows


def method_sentence(method: str, level: float, diff_level: Optional[float] = None, m: int = 1) -> str:
    what = ("Student's t-interval over seeds (mean ± t · s / sqrt(n), n − 1 degrees of freedom)" if method == "t"
            else "percentile bootstrap over seeds (10,000 resamples, seed 0; it covers less than its level at few "
                 "seeds)")
    return (f"Intervals: {level:.0%} {what}; none for one seed. Differences from the baseline are **paired by "
            "seed** (each seed's run minus the baseline's run of the same seed, then the interval of their mean; "
            "`unpaired`: fewer than two shared seeds, Welch's interval). Verdict: **better** when the whole "
            "interval of the difference is below 0 (losses: lower is better), **worse** when it is above, "
            "**within noise** when it holds 0. "
            + (f"The {m} strategies' differences are Bonferroni-corrected: each interval at {diff_level:.2%}, so "
               f"that all {m} verdicts of a metric hold together at {level:.0%}. "
               if diff_level is not None and diff_level != level else "")
            + "See docs/guides/comparing-runs-statistics.md.")


def write_report(root: Path, strategies: list, baseline: Strategy, out: Optional[Path] = None, level: float = LEVEL,
                 method: str = "t", correction: str = "bonferroni") -> dict:
    """report.md, report.csv and the figures in `out` (default `root`); returns {name: path} of what it wrote.
    `level` and `method` ("t" or "bootstrap") set the intervals; `correction` ("bonferroni" or "none") those
    of the differences from the baseline (`stats.comparison_level`)."""
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    ref, stats = summarize(strategies, baseline, level, method, correction)
    compared = sum(s is not baseline for s in strategies)
    diff_level = comparison_level(level, compared, correction)
    mismatch = cost_mismatch(strategies)
    domains = domains_of(strategies)
    tasks = tasks_of(strategies)
    has_target = any(s.target for s in stats)
    names = metric_names(domains, tasks, has_target)
    metrics = [m for m in names if any(m in s.ci for s in stats)]
    head = [m for m in ("val_mean", "target") if m in metrics]
    table, flagged = noise_table(stats)
    summary = [x for x in (verdict_summary(stats, m, names[m]) for m in head) if x]
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
    lines = [f"# Results: {md_text(root)}", "",
             f"{count}. Baseline: **{ref.label}** (final mean validation loss {ref.final_mean:.3f}, averaged over "
             f"its {seeds} seed{'s' * (seeds != 1)}; {ref.steps:.0f} steps). "
             f"Values are means over seeds with their {level:.0%} interval in brackets.", "",
             method_sentence(method, level, diff_level, compared), "",
             md_text(headline(stats, ref)), "", *[md_text(x) + "\n" for x in summary],
             "## Against the baseline, paired by seed", "", versus_table(stats, head, names), "",
             "## Noise: the seed spread of each strategy", "",
             "Sample standard deviation over seeds of each strategy's final mean validation loss, and its ratio to "
             f"the baseline's with the {level:.0%} interval the F distribution gives (wide at few seeds). Flagged: "
             f"a ratio of {SPREAD_FLAG:g}x or more, or 1/{SPREAD_FLAG:g} or less.", "", table, "",
             ("Spread far from the baseline's: " + md_text("; ".join(flagged)) + ". A verdict of such a strategy rests on "
              "its own seeds' noise, not the baseline's." if flagged else
              f"No strategy's seed spread is {SPREAD_FLAG:g}x the baseline's or more (or 1/{SPREAD_FLAG:g} or less)."),
             "",
             f"## Final validation loss, {level:.0%} intervals", "", loss_table(stats, domains, ref.label), "",
             "## Every metric: the paired difference from the baseline and its verdict", "",
             diff_table(stats, metrics, names), "",
             "## Steps, tokens and time to the baseline's final mean validation loss", "",
             "First evaluation at which a run's mean validation loss is at or below the baseline's final mean: "
             f"mean [{level:.0%} interval] over the seeds that reach it (how many of them do); "
             "`x baseline steps` is that step over the baseline's run length, mean ± std over the same seeds. "
             + md_text(cost_sentence(mismatch)), "", cost_table(stats, ref, with_time=not mismatch), ""]
    lines += ["## Figures", ""]
    for name, path in figures.items():
        if path is not None:
            lines += [f"![{name}]({path.name})", "", captions[name], ""]
    skipped = [name for name, path in figures.items() if path is None]
    if skipped:
        lines += [f"Not drawn (no strategy has the data): {', '.join(skipped)}.", ""]
    (out / "report.md").write_text("\n".join(lines))
    with open(out / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows(stats, domains, ref, tasks, metrics, level, method, diff_level,
                                         comparable=not mismatch))
    written = {"report.md": out / "report.md", "report.csv": out / "report.csv"}
    written.update({p.name: p for p in figures.values() if p is not None})
    return {"files": written, "stats": stats, "reference": ref, "markdown": "\n".join(lines)}
