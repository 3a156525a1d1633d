"""Numbers of the results page: per strategy, the final validation losses over seeds with their 95% intervals,
the difference from the baseline paired by seed with its interval and a verdict, the seed spread against the
baseline's, the steps and tokens to reach the baseline's final mean validation loss, wall time and overhead.

Interval of a mean over seeds: Student's t, mean ± t(0.975, n-1) · s / sqrt(n) (`t_interval`; none for one
seed). A percentile bootstrap (`bootstrap_interval`, seeded) is there on request (`--interval bootstrap`), not
by default: with the three to five seeds a sweep has, it covers the true mean far less often than 95% (about
76% at three seeds, 85% at five, in `tests/test_report_stats.py`'s simulation), while the t-interval keeps
95% for normal seed noise. The page says which it used.

Paired difference (`paired_difference`): over the seeds both the strategy and the baseline ran, d_i = x_i - b_i
(same seed: same initial weights, and the same data order where the strategy allows), and the interval of the
mean of d: the paired t-test's interval (scipy's `ttest_rel(...).confidence_interval()`). Pairing removes the
part of the seed noise the two runs share. With fewer than two pairs it falls back to Welch's unpaired
interval, and says so. `verdict`: losses are lower-is-better, so "better" when the whole interval is below 0,
"worse" when it is above, "within noise" when it holds 0, "too few seeds" when there is no interval.

Many strategies against one baseline (`comparison_level`): with m of them, one 95% interval each would call
at least one "better" or "worse" by chance far more often than 5% of the time (1 - 0.95^m: 26% at m = 6). By
default the differences' intervals are Bonferroni-corrected: each at 1 - 0.05 / m, so that all m verdicts of a
metric hold together at 95% (`correction="none"`: each at 95%, as one comparison alone would be). The means'
own intervals stay at the plain level.

Spread is the sample standard deviation over seeds (0 for one seed). `spread_ratio` is a strategy's std over
the baseline's with its F interval; the page flags a ratio at or beyond SPREAD_FLAG (either way).

"Steps to reach" is the first evaluation step at which a run's mean validation loss (mean over domains) is at
or below the baseline's final mean (averaged over the baseline's seeds); its ratio is that step over the
baseline's steps (its run length), per seed, then mean ± std and the t-interval over the seeds that reach it,
with how many do. Wall time per step is the run's wall time (start-up and evaluations included, the same for
every strategy of a sweep) over its steps; overhead is a strategy's median over seeds divided by the baseline's.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Optional

from dataflex.report.runs import Run, Strategy, is_dynamic

NAN = float("nan")


def mean_std(values) -> tuple:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return NAN, NAN
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


LEVEL = 0.95
SPREAD_FLAG = 2.0      # a strategy's seed std this many times the baseline's (or 1/this) is flagged
METHODS = ("t", "bootstrap")


def _finite(values) -> list:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its two-sided interval; lo = hi = nan when there is none (fewer than 2 values)."""
    mean: float
    lo: float
    hi: float
    n: int
    std: float
    method: str           # "t", "bootstrap", "welch" (an unpaired difference), or "none"

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)


EMPTY = Interval(NAN, NAN, NAN, 0, NAN, "none")


def t_interval(values, level: float = LEVEL) -> Interval:
    """mean ± t((1+level)/2, n-1) · s / sqrt(n) over the finite values; no interval for fewer than two."""
    from scipy.stats import t

    vals = _finite(values)
    n = len(vals)
    if n == 0:
        return EMPTY
    mean, std = mean_std(vals)
    if n < 2:
        return Interval(mean, NAN, NAN, n, std, "none")
    half = float(t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std, "t")


def bootstrap_interval(values, level: float = LEVEL, resamples: int = 10_000, seed: int = 0) -> Interval:
    """Percentile bootstrap of the mean: `resamples` draws of n values with replacement from a numpy
    Generator seeded with `seed`, the (1-level)/2 and (1+level)/2 quantiles of their means (numpy's
    default, linear interpolation). Under-covers at few seeds (see the module docstring)."""
    import numpy as np

    vals = _finite(values)
    n = len(vals)
    if n == 0:
        return EMPTY
    mean, std = mean_std(vals)
    if n < 2:
        return Interval(mean, NAN, NAN, n, std, "none")
    rng = np.random.default_rng(seed)
    means = np.asarray(vals)[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean, float(lo), float(hi), n, std, "bootstrap")


def interval(values, level: float = LEVEL, method: str = "t", seed: int = 0) -> Interval:
    if method not in METHODS:
        raise ValueError(f"interval method must be one of {METHODS}, got {method!r}")
    return t_interval(values, level) if method == "t" else bootstrap_interval(values, level, seed=seed)


def at_least_zero(iv: Interval) -> Interval:
    """The interval of a quantity that cannot be negative (steps), its lower end clipped at 0."""
    return Interval(iv.mean, max(iv.lo, 0.0), iv.hi, iv.n, iv.std, iv.method) if iv.has_interval else iv


def welch_interval(x, y, level: float = LEVEL) -> Interval:
    """mean(x) - mean(y) with Welch's interval (unequal variances, Welch-Satterthwaite degrees of freedom)."""
    from scipy.stats import t

    x, y = _finite(x), _finite(y)
    if not x or not y:
        return EMPTY
    diff = statistics.mean(x) - statistics.mean(y)
    if len(x) < 2 or len(y) < 2:
        return Interval(diff, NAN, NAN, 0, NAN, "none")
    vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return Interval(diff, diff, diff, 0, 0.0, "welch")
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = float(t.ppf((1 + level) / 2, df)) * se
    return Interval(diff, diff - half, diff + half, 0, NAN, "welch")


def paired_difference(values: dict, baseline: dict, level: float = LEVEL, method: str = "t",
                      seed: int = 0) -> Interval:
    """{seed: value} of a strategy minus {seed: value} of the baseline, paired by seed: the interval of the
    mean of the per-seed differences over the seeds both have (n = the number of pairs). With fewer than two
    pairs, Welch's unpaired interval over all their seeds (method "welch", n = 0)."""
    common = [k for k in values if k is not None and k in baseline
              and all(v is not None and math.isfinite(v) for v in (values[k], baseline[k]))]
    if len(common) >= 2:
        return interval([values[k] - baseline[k] for k in common], level, method, seed)
    return welch_interval(list(values.values()), list(baseline.values()), level)


CORRECTIONS = ("bonferroni", "none")


def comparison_level(level: float, m: int, correction: str = "bonferroni") -> float:
    """The level of each of m differences' intervals so that all of them hold together at `level`
    (Bonferroni: 1 - (1 - level) / m); `level` itself without a correction or for one comparison."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    return level if correction == "none" or m <= 1 else 1 - (1 - level) / m


def verdict(diff: Interval, lower_is_better: bool = True) -> str:
    """better / worse / within noise from the interval of (strategy - baseline); too few seeds without one."""
    if not diff.has_interval:
        return "too few seeds"
    if diff.hi < 0 or diff.lo > 0:
        return "better" if (diff.hi < 0) == lower_is_better else "worse"
    return "within noise"


def spread_ratio(std: float, n: int, base_std: float, base_n: int, level: float = LEVEL) -> tuple:
    """(ratio, lo, hi): a strategy's seed std over the baseline's, with the interval that the F distribution
    gives normal seed noise, sqrt(r² / F((1+level)/2; n-1, m-1)) .. sqrt(r² / F((1-level)/2; n-1, m-1)).
    nan where either has fewer than two seeds or the baseline's std is 0."""
    from scipy.stats import f

    if n < 2 or base_n < 2 or not base_std or not all(map(math.isfinite, (std, base_std))):
        return NAN, NAN, NAN
    r2 = (std / base_std) ** 2
    lo = math.sqrt(r2 / float(f.ppf((1 + level) / 2, n - 1, base_n - 1)))
    hi = math.sqrt(r2 / float(f.ppf((1 - level) / 2, n - 1, base_n - 1)))
    return math.sqrt(r2), lo, hi


def spread_flag(ratio: float) -> str:
    """'' unless the std ratio is at or beyond SPREAD_FLAG either way."""
    if not math.isfinite(ratio):
        return ""
    if ratio >= SPREAD_FLAG:
        return f"{ratio:.1f}x the baseline's spread"
    if ratio <= 1 / SPREAD_FLAG:
        return f"{ratio:.2f}x the baseline's spread"
    return ""


def mean_loss(val: dict) -> float:
    vals = [v for v in (val or {}).values() if v is not None and math.isfinite(v)]
    return statistics.mean(vals) if vals else NAN


def curve(run: Run, what: str = "mean") -> list:
    """[(step, loss)] over the run's evaluations: `mean` (over domains), `target`, or one domain's."""
    points = []
    for step, val, target in run.evals():
        value = mean_loss(val) if what == "mean" else target if what == "target" else val.get(what)
        if value is not None and math.isfinite(value):
            points.append((step, float(value)))
    return points


def final(run: Run) -> dict:
    """{domain: final validation loss, ..., "mean": ..., "target": ... or None}."""
    val = run.summary.get("val_loss") or (run.evals()[-1][1] if run.evals() else {})
    target = run.summary.get("target_loss")
    if target is None and run.evals():
        target = run.evals()[-1][2]
    return {**val, "mean": mean_loss(val), "target": target}


def steps_to_reach(points: list, level: float) -> Optional[int]:
    """The first evaluated step whose loss is at or below `level`; None when none is."""
    return next((step for step, value in points if value <= level), None)


def per_step(run: Run, key: str) -> float:
    steps = run.summary.get("steps") or 0
    value = run.summary.get(key)
    return value / steps if steps and value is not None else NAN


def band(runs: list, what: str = "mean") -> tuple:
    """(steps, mean, low, high) of a curve over seeds, at the steps every run evaluated."""
    curves = [dict(curve(r, what)) for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    rows = [[c[s] for c in curves] for s in steps]
    return steps, [statistics.mean(r) for r in rows], [min(r) for r in rows], [max(r) for r in rows]


@dataclass
class Reference:
    """What every strategy is measured against: the baseline's final mean validation loss and run length."""
    label: str
    final_mean: float
    steps: float
    sec_per_step: float


def reference(baseline: Strategy) -> Reference:
    finals = [final(r)["mean"] for r in baseline.runs]
    return Reference(baseline.label, mean_std(finals)[0], mean_std([r.summary.get("steps") for r in baseline.runs])[0],
                     median([per_step(r, "wall_time_s") for r in baseline.runs]))


def median(values) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else NAN


@dataclass
class StrategyStats:
    label: str
    seeds: list
    domains: dict            # domain -> (mean, std) of the final validation loss
    mean: tuple              # (mean, std) of the final mean validation loss
    target: Optional[tuple]  # (mean, std) of the final target loss; None without a target
    tasks: dict              # target subtask -> (mean, std) of its final loss ({} without subtasks)
    reach: list              # per seed: first step at or below the baseline's final mean (None: never)
    ratio: tuple             # (mean, std) of reach / baseline steps over the seeds that reach it
    tokens: tuple            # (mean, std) of the tokens trained up to that step
    wall: tuple              # (mean, std) wall time of the run, seconds
    sec_per_step: float      # median over seeds
    overhead: float          # sec_per_step / the baseline's
    dynamic: bool
    values: dict = field(default_factory=dict)   # metric -> {seed: final value} (metric_names' keys)
    ci: dict = field(default_factory=dict)       # metric -> Interval of its mean over seeds
    diff: dict = field(default_factory=dict)     # metric -> Interval of (this - baseline), paired by seed
    verdicts: dict = field(default_factory=dict)  # metric -> better / worse / within noise / too few seeds
    reach_ci: Interval = EMPTY                   # steps to the baseline's final mean, over the seeds that reach it
    ratio_ci: Interval = EMPTY                   # the same over the baseline's steps
    spread: tuple = (NAN, NAN, NAN)              # the mean loss's seed std over the baseline's: (ratio, lo, hi)
    is_baseline: bool = False

    @property
    def reached(self) -> int:
        return sum(r is not None for r in self.reach)


def metric_names(domains: list, tasks: list, has_target: bool) -> dict:
    """{metric key: what the page calls it}: "val_mean" first, then the target and its subtasks, then domains."""
    out = {"val_mean": "mean validation loss"}
    if has_target:
        out["target"] = "target loss"
        out.update({f"target_{t}": f"target: {t}" for t in tasks})
    out.update({f"val_{d}": d for d in domains})
    return out


def seed_key(run: Run):
    """What pairs a run with the baseline's: its seed (a run without one pairs with nothing)."""
    return run.seed if run.seed is not None else f"?{run.dir}"


def run_metrics(run: Run) -> dict:
    """{metric key: final value} of one run (metric_names' keys; a missing one is left out)."""
    f = final(run)
    out = {"val_mean": f["mean"]}
    out.update({f"val_{d}": v for d, v in f.items() if d not in ("mean", "target")})
    if f["target"] is not None:
        out["target"] = f["target"]
    out.update({f"target_{t}": v for t, v in run.target_tasks().items()})
    return out


def seed_values(s: Strategy) -> dict:
    """metric -> {seed: final value}."""
    out: dict = {}
    for r in s.runs:
        for k, v in run_metrics(r).items():
            if v is not None and math.isfinite(v):
                out.setdefault(k, {})[seed_key(r)] = float(v)
    return out


def strategy_stats(s: Strategy, ref: Reference, domains: list, base_values: Optional[dict] = None,
                   level: float = LEVEL, method: str = "t", is_baseline: bool = False,
                   diff_level: Optional[float] = None) -> StrategyStats:
    """`diff_level`: the level of the paired differences' intervals (default `level`; see `comparison_level`)."""
    finals = [final(r) for r in s.runs]
    reach = [steps_to_reach(curve(r, "mean"), ref.final_mean) for r in s.runs]
    hits = [(step, r) for step, r in zip(reach, s.runs) if step is not None]
    targets = [f["target"] for f in finals if f["target"] is not None]
    sps = median([per_step(r, "wall_time_s") for r in s.runs])
    values = seed_values(s)
    base_values = values if base_values is None else base_values
    ci = {k: interval(v.values(), level, method) for k, v in values.items()}
    diff = {k: paired_difference(v, base_values[k], diff_level or level, method)
            for k, v in values.items() if k in base_values}
    ratios = [step / ref.steps for step, _ in hits] if ref.steps else []
    base_mean = base_values.get("val_mean", {})
    mine = values.get("val_mean", {})
    return StrategyStats(
        label=s.label, seeds=[r.seed for r in s.runs],
        domains={d: mean_std(f.get(d) for f in finals) for d in domains},
        mean=mean_std(f["mean"] for f in finals),
        target=mean_std(targets) if targets else None,
        tasks={t: mean_std(r.target_tasks().get(t) for r in s.runs) for t in tasks_of([s])},
        reach=reach,
        ratio=mean_std(ratios) if ref.steps else (NAN, NAN),
        tokens=mean_std(step * per_step(r, "tokens") for step, r in hits),
        wall=mean_std(r.summary.get("wall_time_s") for r in s.runs),
        sec_per_step=sps, overhead=sps / ref.sec_per_step if ref.sec_per_step else NAN,
        dynamic=is_dynamic(s), values=values, ci=ci, diff=diff,
        verdicts={k: "baseline" if is_baseline else verdict(d) for k, d in diff.items()},
        reach_ci=at_least_zero(interval([step for step, _ in hits], level, method)),
        ratio_ci=at_least_zero(interval(ratios, level, method)),
        spread=spread_ratio(mean_std(mine.values())[1], len(mine), mean_std(base_mean.values())[1], len(base_mean),
                            level),
        is_baseline=is_baseline)


def domains_of(strategies: list) -> list:
    """Validation domains in first-seen order."""
    seen = {}
    for s in strategies:
        for r in s.runs:
            for d in (r.summary.get("val_loss") or {}):
                seen.setdefault(d, None)
    return list(seen)


def tasks_of(strategies: list) -> list:
    """The target's subtasks in first-seen order."""
    return list(dict.fromkeys(t for s in strategies for r in s.runs for t in r.target_tasks()))


def summarize(strategies: list, baseline: Strategy, level: float = LEVEL, method: str = "t",
              correction: str = "bonferroni") -> tuple:
    """(reference, [StrategyStats] in the strategies' order), each paired by seed with the baseline, the
    differences' intervals at `comparison_level(level, number of strategies compared, correction)`."""
    ref = reference(baseline)
    domains = domains_of(strategies)
    base_values = seed_values(baseline)
    diff_level = comparison_level(level, sum(s is not baseline for s in strategies), correction)
    return ref, [strategy_stats(s, ref, domains, base_values, level, method, is_baseline=s is baseline,
                                diff_level=diff_level) for s in strategies]


def best_dynamic(stats: list, baseline: Optional[str] = None) -> Optional[StrategyStats]:
    """The dynamic strategy (not the baseline) that reaches the baseline's final mean on the most seeds, then
    in the fewest steps (mean ratio); None when no dynamic strategy reaches it."""
    cands = [s for s in stats if s.dynamic and s.reached and s.label != baseline]
    return min(cands, key=lambda s: (-s.reached / len(s.reach), s.ratio[0])) if cands else None
