"""Numbers of the results page: per strategy, mean and spread over seeds of the final validation losses, the
steps and tokens to reach the baseline's final mean validation loss, wall time and overhead per step.

Spread is the sample standard deviation over seeds (0 for one seed). "Steps to reach" is the first evaluation
step at which a run's mean validation loss (mean over domains) is at or below the baseline's final mean
(averaged over the baseline's seeds); its ratio is that step over the baseline's steps (its run length), per
seed, then mean ± std over the seeds that reach it. Wall time per step is the run's wall time (start-up and
evaluations included, the same for every strategy of a sweep) over its steps; overhead is a strategy's
median over seeds divided by the baseline's.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from dataflex.report.runs import Run, Strategy, is_dynamic

NAN = float("nan")


def mean_std(values) -> tuple:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return NAN, NAN
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


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

    @property
    def reached(self) -> int:
        return sum(r is not None for r in self.reach)


def strategy_stats(s: Strategy, ref: Reference, domains: list) -> StrategyStats:
    finals = [final(r) for r in s.runs]
    reach = [steps_to_reach(curve(r, "mean"), ref.final_mean) for r in s.runs]
    hits = [(step, r) for step, r in zip(reach, s.runs) if step is not None]
    targets = [f["target"] for f in finals if f["target"] is not None]
    sps = median([per_step(r, "wall_time_s") for r in s.runs])
    return StrategyStats(
        label=s.label, seeds=[r.seed for r in s.runs],
        domains={d: mean_std(f.get(d) for f in finals) for d in domains},
        mean=mean_std(f["mean"] for f in finals),
        target=mean_std(targets) if targets else None,
        tasks={t: mean_std(r.target_tasks().get(t) for r in s.runs) for t in tasks_of([s])},
        reach=reach,
        ratio=mean_std(step / ref.steps for step, _ in hits) if ref.steps else (NAN, NAN),
        tokens=mean_std(step * per_step(r, "tokens") for step, r in hits),
        wall=mean_std(r.summary.get("wall_time_s") for r in s.runs),
        sec_per_step=sps, overhead=sps / ref.sec_per_step if ref.sec_per_step else NAN,
        dynamic=is_dynamic(s))


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


def summarize(strategies: list, baseline: Strategy) -> tuple:
    """(reference, [StrategyStats] in the strategies' order)."""
    ref = reference(baseline)
    domains = domains_of(strategies)
    return ref, [strategy_stats(s, ref, domains) for s in strategies]


def best_dynamic(stats: list, baseline: Optional[str] = None) -> Optional[StrategyStats]:
    """The dynamic strategy (not the baseline) that reaches the baseline's final mean on the most seeds, then
    in the fewest steps (mean ratio); None when no dynamic strategy reaches it."""
    cands = [s for s in stats if s.dynamic and s.reached and s.label != baseline]
    return min(cands, key=lambda s: (-s.reached / len(s.reach), s.ratio[0])) if cands else None
