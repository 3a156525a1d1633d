"""The results page's figures (matplotlib, Agg, PNG at 150 dpi). One colour per strategy in every figure,
from the sorted list of strategy labels; every function returns the file it wrote, or None (and writes
nothing) when no strategy has the data it plots."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from dataflex.report.stats import band, curve

DPI = 150


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False     # domain names are text: `$x$` is not TeX
    import matplotlib.pyplot as plt
    return plt


def colours(labels) -> dict:
    """{label: colour}: the same strategy gets the same colour in every plot of a page (tab10, tab20 past ten)."""
    import matplotlib

    names = sorted(set(labels))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, name in enumerate(names)}


def _grid(n: int, width: float = 4.6, height: float = 3.4):
    plt = _plt()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _finish(fig, path: Path, handles, labels, title: str = "strategy") -> Path:
    """Lay out the panels, put the legend under them (outside every curve), save at DPI."""
    plt = _plt()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", ncol=2 if len(labels) > 3 else max(len(labels), 1), fontsize=8,
               title=title, title_fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _zoom(ax, values: list) -> None:
    """The later part of training fills the axis: the first evaluations (far higher) are cut off."""
    vals = [v for v in values if math.isfinite(v)]
    if vals:
        lo, hi = min(vals), max(vals)
        pad = max(hi - lo, 1e-3) * 0.15
        ax.set_ylim(lo - pad, hi + pad)


def validation_curves(strategies: list, path: Path, colour: dict, baseline_final: Optional[float] = None,
                      domains: Optional[list] = None) -> Optional[Path]:
    """Mean validation loss, each domain's and the target's, over steps: mean over seeds, band min..max."""
    domains = domains or []
    panels = ["mean"] + domains + (["target"] if any(curve(r, "target") for s in strategies for r in s.runs) else [])
    if not any(curve(r, "mean") for s in strategies for r in s.runs):
        return None
    fig, axes = _grid(len(panels))
    handles = []
    for ax, what in zip(axes, panels):
        later = []
        last = max((st for s in strategies for st in band(s.runs, what)[0]), default=0)
        for s in strategies:
            steps, mean, lo, hi = band(s.runs, what)
            if not steps:
                continue
            line, = ax.plot(steps, mean, color=colour[s.label], linewidth=1.6, marker="o", markersize=2.5)
            if len(s.runs) > 1:
                ax.fill_between(steps, lo, hi, color=colour[s.label], alpha=0.18, linewidth=0)
            later += [v for st, a, b in zip(steps, lo, hi) if st >= 0.3 * last for v in (a, b)]
            if ax is axes[0]:
                handles.append((line, f"{s.label} (n={len(s.runs)})"))
        if what == "mean" and baseline_final is not None and math.isfinite(baseline_final):
            ax.axhline(baseline_final, color="black", linestyle=":", linewidth=1)
            ax.annotate("baseline's final", (0.01, baseline_final), xycoords=("axes fraction", "data"),
                        fontsize=7, va="bottom")
            later.append(baseline_final)
        _zoom(ax, later)
        title = {"mean": "mean over domains", "target": "target set"}.get(what, what)
        ax.set(xlabel="step", ylabel="validation loss" if what != "target" else "target loss",
               title=f"{title} (seed band: min..max)" if what == "mean" else title)
        ax.grid(alpha=0.3)
    return _finish(fig, path, [h for h, _ in handles], [lab for _, lab in handles])


def domain_weights(strategies: list, path: Path, colour: dict) -> Optional[Path]:
    """Per domain, its weight over steps for every strategy with a mixer: mean over seeds, band min..max."""
    chosen = [s for s in strategies if s.plugins.get("mixer")]
    series = {}
    for s in chosen:
        per_run = []
        for r in s.runs:
            rows = [h for h in r.history if h.get("domain_weights")]
            if rows:
                per_run.append(rows)
        if per_run:
            series[s.label] = per_run
    if not series:
        return None
    domains = list(next(iter(series.values()))[0][-1]["domain_weights"])
    fig, axes = _grid(len(domains))
    handles = {}
    for ax, d in zip(axes, domains):
        for s in chosen:
            if s.label not in series:
                continue
            runs = [{h["step"]: h["domain_weights"].get(d, math.nan) for h in rows} for rows in series[s.label]]
            steps = sorted(set.intersection(*(set(x) for x in runs)))
            vals = [[x[st] for x in runs] for st in steps]
            mean = [sum(v) / len(v) for v in vals]
            line, = ax.plot(steps, mean, color=colour[s.label], linewidth=1.4)
            if len(runs) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=colour[s.label],
                                alpha=0.18, linewidth=0)
            handles.setdefault(s.label, line)
        ax.set(xlabel="step", ylabel="domain weight", title=d, ylim=(0, None))
        ax.grid(alpha=0.3)
    return _finish(fig, path, list(handles.values()), list(handles))


def sample_weights(strategies: list, path: Path, colour: dict) -> Optional[Path]:
    """Histogram of the per-sample weights of kept samples (ledger), all steps and seeds, per reweighter."""
    import numpy as np

    data = {}
    for s in strategies:
        if not s.plugins.get("reweighter"):
            continue
        parts = [t[t["selected"]]["weight"].to_numpy() for r in s.runs
                 if (t := r.ledger(["selected", "weight"])) is not None]
        if parts and sum(len(p) for p in parts):
            data[s.label] = np.concatenate(parts)
    if not data:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    everything = np.concatenate(list(data.values()))
    bins = np.linspace(float(everything.min()), float(everything.max()) + 1e-9, 41)
    for label, w in data.items():
        ax.hist(w, bins=bins, weights=np.full(len(w), 1.0 / len(w)), histtype="step", linewidth=1.6,
                color=colour[label], label=f"{label} (mean {w.mean():.2f}, std {w.std():.2f})")
    ax.set(xlabel="sample weight (kept samples, all steps and seeds)", ylabel="fraction of samples (log)",
           title="per-sample weights", yscale="log")
    ax.grid(alpha=0.3)
    return _finish(fig, path, *ax.get_legend_handles_labels())


def selection_rates(strategies: list, path: Path, colour: dict) -> Optional[Path]:
    """Fraction of each domain a selector kept: of its pool for pool selectors (their kept counts), else of
    its candidates (ledger); mean over seeds, error bar = std."""
    import numpy as np

    rates = {}
    for s in strategies:
        if not s.plugins.get("selector"):
            continue
        per_seed = []
        for r in s.runs:
            pool = r.pool_kept()
            t = None if pool else r.ledger(["domain", "selected"])
            if pool:
                per_seed.append(pool)
            elif t is not None and len(t):
                per_seed.append(t.groupby("domain")["selected"].mean().to_dict())
        if per_seed:
            rates[s.label] = per_seed
    if not rates:
        return None
    order = [d for s in strategies for r in s.runs for d in (r.summary.get("domain_weights") or {})]
    domains = list(dict.fromkeys(order + [d for seeds in rates.values() for seed in seeds for d in seed]))
    domains = [d for d in domains if any(d in seed for seeds in rates.values() for seed in seeds)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.0 * len(domains) * max(1, len(rates)) ** 0.5 + 2), 4.2))
    width = 0.8 / len(rates)
    for i, (label, seeds) in enumerate(rates.items()):
        vals = np.array([[seed.get(d, np.nan) for d in domains] for seed in seeds])
        mean = np.nanmean(vals, axis=0)
        std = np.nanstd(vals, axis=0, ddof=1) if len(seeds) > 1 else np.zeros(len(domains))
        x = np.arange(len(domains)) - 0.4 + width * (i + 0.5)
        ax.bar(x, mean, width, yerr=std, capsize=2, color=colour[label], label=f"{label} (n={len(seeds)})")
    ax.set_xticks(np.arange(len(domains)), domains)
    ax.set(xlabel="domain", ylabel="fraction kept (of the pool, or of the candidates)", title="selection rate per domain",
           ylim=(0, 1.05))
    ax.grid(alpha=0.3, axis="y")
    return _finish(fig, path, *ax.get_legend_handles_labels())
