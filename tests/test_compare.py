"""launch/compare.py and dataflex/report: runs grouped into strategies over seeds, the page's numbers,
its figures, and one sweep of real tiny runs (with a target set) turned into the page."""
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dataflex.report import find_runs, group_runs, pick_baseline, plots, write_report
from dataflex.report.runs import is_dynamic
from dataflex.report.stats import best_dynamic, mean_std, steps_to_reach, summarize
from dataflex.run.outputs import LEDGER_SCHEMA, sweep_group

ROOT = Path(__file__).resolve().parents[1]


def make_run(folder: Path, strategy: dict, overrides: list, seed: int, means: list, steps: int = 20,
             tokens: int = 2000, wall: float = 20.0, mixer_cfg: dict = None, weights: bool = False,
             ledger: dict = None, target: list = None, tasks: list = None):
    """A finished run folder: evaluations at steps 0, 10, 20, ... with validation loss mean ± 0.5 on domains a, b."""
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + [f"trainer.seed={seed}"]))
    config = {"trainer": {"seed": seed, "max_steps": steps}, **({"mixer": mixer_cfg} if mixer_cfg else {})}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for i, m in enumerate(means):
        rec = {"step": 10 * i, "val_loss": {"a": m - 0.5, "b": m + 0.5}}
        if target:
            rec["target_loss"] = target[i]
        if tasks:
            rec["target_loss_by_task"] = tasks[i]
        lines.append(rec)
        if weights:
            lines.append({"step": 10 * i, "train_loss": m,
                          "domain_weights": {"a": 0.5 + 0.01 * i, "b": 0.5 - 0.01 * i}})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"strategy": {"mixer": None, "selector": None, "reweighter": None, **strategy}, "steps": steps,
               "tokens": tokens, "wall_time_s": wall, "val_loss": lines[-1 - weights]["val_loss"],
               "domain_weights": {"a": 0.5, "b": 0.5}}
    if target:
        summary["target_loss"] = target[-1]
    (folder / "summary.json").write_text(json.dumps(summary))
    if ledger:
        (folder / "ledger").mkdir()
        n = len(ledger["domain"])
        table = {"step": [0] * n, "rank": [0] * n, "row": list(range(n)), "sample_id": list(range(n)), "loss": [1.0] * n,
                 **ledger}
        pd.DataFrame(table)[LEDGER_SCHEMA.names].to_parquet(folder / "ledger" / "part-0000000-0000000.parquet")
    return folder


STATIC = ({"mixer": "static"}, ["+mixer=static", "mixer.weights=uniform", "backend=torch"],
          {"weights": "uniform", "temperature": 1.0})
BANDIT = ({"mixer": "bandit"}, ["+mixer=bandit", "backend=torch"], {"_target_": "BanditMixer"})


@pytest.fixture
def sweep(tmp_path):
    """bench/sweeps.py's layout: FAMILY/vI/SEED; the baseline (static uniform) second, to test the choice."""
    root = tmp_path / "mixers"
    bandit = [[5.0, 3.0, 2.5], [5.0, 3.5, 3.1], [5.0, 4.0, 3.5]]     # reaches 3.1 at 10, at 20, never
    for seed, means in enumerate(bandit):
        make_run(root / "v0" / str(seed), BANDIT[0], BANDIT[1], seed, means, wall=[60, 60, 90][seed],
                 mixer_cfg=BANDIT[2], weights=True)
    for seed, means in enumerate([[5.0, 4.0, 3.0], [5.0, 4.2, 3.2]]):  # final means 3.0, 3.2: the target is 3.1
        make_run(root / "v1" / str(seed), STATIC[0], STATIC[1], seed, means, wall=[20, 40][seed],
                 mixer_cfg=STATIC[2], weights=True)
    return root


def test_runs_group_by_config_minus_seed(sweep):
    strategies = group_runs(find_runs(sweep))
    assert [s.label for s in strategies] == ["mixer=bandit", "mixer=static (weights=uniform)"]
    assert [[r.seed for r in s.runs] for s in strategies] == [[0, 1, 2], [0, 1]]
    assert pick_baseline(strategies).label == "mixer=static (weights=uniform)"
    assert pick_baseline(strategies, "bandit").label == "mixer=bandit"
    with pytest.raises(ValueError, match="matches 2"):
        pick_baseline(strategies, "mixer=")
    assert [is_dynamic(s) for s in strategies] == [True, False]


def test_plain_multirun_layout_and_default_baselines(tmp_path):
    """`launch/train.py -m +mixer=bandit,static trainer.seed=0,1`: jobs 0..3 side by side; no static run:
    the run without plugins is the baseline, else the first strategy."""
    for job, (kind, seed) in enumerate([(BANDIT, 0), (STATIC, 0), (BANDIT, 1), (STATIC, 1)]):
        make_run(tmp_path / "sweep" / str(job), kind[0], kind[1][:1], seed, [5.0, 4.0], mixer_cfg=kind[2])
    strategies = group_runs(find_runs(tmp_path / "sweep"))
    assert [(s.label, len(s.runs)) for s in strategies] == [("mixer=bandit", 2), ("mixer=static", 2)]
    assert pick_baseline(strategies).label == "mixer=static"
    make_run(tmp_path / "other" / "0", {"reweighter": "loss"}, ["+reweighter=loss"], 0, [5.0, 4.0])
    make_run(tmp_path / "other" / "1", {}, [], 0, [5.0, 4.0])
    others = group_runs(find_runs(tmp_path / "other"))
    assert pick_baseline(others).label == "size-proportional, no plugins"
    assert pick_baseline(others[:1]).label == "reweighter=loss"


def test_stats_exact(sweep):
    strategies = group_runs(find_runs(sweep))
    ref, (bandit, static) = summarize(strategies, pick_baseline(strategies))
    assert ref.final_mean == pytest.approx(3.1) and ref.steps == 20 and ref.sec_per_step == pytest.approx(1.5)
    assert bandit.reach == [10, 20, None] and bandit.reached == 2
    assert bandit.ratio == pytest.approx((0.75, statistics.stdev([0.5, 1.0])))
    assert bandit.tokens == pytest.approx((1500.0, statistics.stdev([1000, 2000])))    # 100 tokens per step
    assert bandit.mean == pytest.approx((statistics.mean([2.5, 3.1, 3.5]), statistics.stdev([2.5, 3.1, 3.5])))
    assert bandit.domains["a"] == pytest.approx((statistics.mean([2.0, 2.6, 3.0]), statistics.stdev([2.0, 2.6, 3.0])))
    assert bandit.wall == pytest.approx((70.0, statistics.stdev([60, 60, 90])))
    assert bandit.sec_per_step == pytest.approx(3.0) and bandit.overhead == pytest.approx(2.0)
    assert static.reach == [20, None] and static.ratio == (1.0, 0.0) and static.overhead == pytest.approx(1.0)
    assert bandit.target is None
    assert best_dynamic([bandit, static], ref.label) is bandit
    # steps to the baseline's final mean: the t-interval over the 2 seeds that reach it, clipped at 0 steps
    half = 12.7062047 * statistics.stdev([10, 20]) / math.sqrt(2)
    assert (bandit.reach_ci.mean, bandit.reach_ci.lo, bandit.reach_ci.hi) == pytest.approx((15, 0.0, 15 + half))
    # paired by seed over the two seeds both ran (0 and 1): bandit - static = 2.5 - 3.0, 3.1 - 3.2
    d = [2.5 - 3.0, 3.1 - 3.2]
    half = 12.7062047 * statistics.stdev(d) / math.sqrt(2)
    diff = bandit.diff["val_mean"]
    assert diff.n == 2 and (diff.mean, diff.lo, diff.hi) == pytest.approx((-0.3, -0.3 - half, -0.3 + half))
    assert bandit.verdicts["val_mean"] == "within noise" and static.verdicts["val_mean"] == "baseline"
    assert bandit.values["val_a"] == pytest.approx({0: 2.0, 1: 2.6, 2: 3.0})
    assert steps_to_reach([(0, 5.0), (10, 3.1)], 3.1) == 10 and steps_to_reach([(0, 5.0)], 3.0) is None
    assert mean_std([2.0]) == (2.0, 0.0) and all(math.isnan(x) for x in mean_std([]))


def test_colours_are_stable_and_shared_by_every_plot(sweep, monkeypatch):
    labels = ["b", "a", "c", "d"]
    assert plots.colours(labels) == plots.colours(list(reversed(labels)))
    assert len(set(plots.colours(labels).values())) == 4
    assert len(set(plots.colours([f"s{i}" for i in range(15)]).values())) == 15    # tab20 past ten
    strategies = group_runs(find_runs(sweep))
    colour = plots.colours(s.label for s in strategies)
    seen = {}
    real = plots._finish

    def capture(fig, path, handles, labels, title="strategy"):
        seen[path.name] = {label: h.get_color() for h, label in zip(handles, labels)}
        return real(fig, path, handles, labels, title)

    monkeypatch.setattr(plots, "_finish", capture)
    plots.validation_curves(strategies, sweep / "v.png", colour, 3.1, ["a", "b"])
    plots.domain_weights(strategies, sweep / "w.png", colour)
    for s in strategies:
        assert seen["v.png"][f"{s.label} (n={len(s.runs)})"] == colour[s.label] == seen["w.png"][s.label]


def test_page_lists_every_strategy_and_writes_its_files(sweep, tmp_path):
    ledger = {"domain": ["a", "a", "b", "b"], "selected": [True, False, True, True], "weight": [1.0, 0.0, 0.5, 1.5]}
    make_run(sweep / "v2" / "0", {"selector": "loss", "reweighter": "loss"},
             ["+selector=loss", "+reweighter=loss", "backend=torch"],
             0, [5.0, 3.0, 2.9], ledger=ledger, target=[6.0, 5.0, 4.5],
             tasks=[{"x": 6.5, "y": 5.5}, {"x": 5.5, "y": 4.5}, {"x": 5.0, "y": 4.0}])
    strategies = group_runs(find_runs(sweep))
    page = write_report(sweep, strategies, pick_baseline(strategies), tmp_path / "page")
    md = (tmp_path / "page" / "report.md").read_text()
    for s in strategies:
        assert s.label in md
    assert "**mixer=static (weights=uniform)** (baseline)" in md
    assert "| target | target: x | target: y |" in md                   # the target's columns, where there is one
    assert "| 4.500 (1 seed) | 5.000 (1 seed) | 4.000 (1 seed) |" in md
    assert "Best dynamic strategy: **selector=loss, reweighter=loss**" in md and "0.50 ± 0.00x" in md
    for name in ("report.md", "report.csv", "val_curves.png", "domain_weights.png", "sample_weights.png",
                 "selection_rates.png"):
        assert (tmp_path / "page" / name).stat().st_size > 0, name
        assert name in page["files"]
    for name in ("val_curves.png", "domain_weights.png", "sample_weights.png", "selection_rates.png"):
        assert f"]({name})" in md
    rows = list(csv.DictReader(open(tmp_path / "page" / "report.csv")))
    assert [r["strategy"] for r in rows] == [s.label for s in strategies]
    assert float(rows[0]["ratio_mean"]) == pytest.approx(0.75) and rows[0]["reached"] == "2"


def test_page_verdicts_spread_and_interval_columns(tmp_path):
    """Three seeds each; every seed moves all strategies alike (effects 0, +0.2, -0.1). `sure` is 0.05 below the
    baseline on every seed (better, paired), `noisy` scatters around it with 5x its spread (within noise,
    flagged), `worse` is 0.04 above on every seed."""
    effect = [0.0, 0.2, -0.1]
    kinds = {"static": (STATIC, [0.0, 0.0, 0.0]), "sure": (({"reweighter": "loss"}, ["+reweighter=loss"]), [-0.05] * 3),
             "noisy": (({"reweighter": "focal"}, ["+reweighter=focal"]), [0.4, -0.3, -0.1]),
             "worse": (({"reweighter": "tilted"}, ["+reweighter=tilted"]), [0.04, 0.041, 0.039])}
    for i, (name, (kind, delta)) in enumerate(kinds.items()):
        for seed in range(3):
            final = 3.0 + effect[seed] + delta[seed] + 0.001 * seed * (name == "static")
            make_run(tmp_path / "s" / f"v{i}" / str(seed), kind[0], kind[1], seed, [5.0, 4.0, final],
                     mixer_cfg=kind[2] if len(kind) > 2 else None)
    strategies = group_runs(find_runs(tmp_path / "s"))
    page = write_report(tmp_path / "s", strategies, pick_baseline(strategies), tmp_path / "page")
    rows = {r["strategy"]: r for r in csv.DictReader(open(tmp_path / "page" / "report.csv"))}
    assert {k: rows[k]["val_mean_verdict"] for k in rows} == {
        "mixer=static (backend=torch, weights=uniform)": "baseline", "reweighter=loss": "better", "reweighter=focal": "within noise",
        "reweighter=tilted": "worse"}
    sure = rows["reweighter=loss"]
    assert float(sure["val_mean_diff"]) == pytest.approx(-0.05 - 0.001)
    assert float(sure["val_mean_diff_lo"]) < float(sure["val_mean_diff"]) < float(sure["val_mean_diff_hi"]) < 0
    assert sure["val_mean_pairs"] == "3" and sure["interval"] == "t" and float(sure["level"]) == 0.95
    finals = [3.0 + e - 0.05 for e in effect]
    lo, hi = (float(sure["val_mean_lo"]), float(sure["val_mean_hi"]))
    ci = __import__("scipy.stats", fromlist=["t"]).t.interval(0.95, 2, statistics.mean(finals),
                                                             statistics.stdev(finals) / math.sqrt(3))
    assert (lo, hi) == pytest.approx(ci)                        # the interval of the mean, unpaired
    assert lo < float(rows["mixer=static (backend=torch, weights=uniform)"]["val_mean_mean"]) < hi   # overlaps, yet paired: better
    for key in ("val_a_lo", "val_b_hi", "val_a_diff_lo", "steps_to_baseline_lo", "spread_ratio_hi"):
        assert key in sure
    md = page["markdown"]
    assert "paired by seed: better: reweighter=loss; worse: reweighter=tilted; within noise: reweighter=focal." in md
    assert "| reweighter=loss | 3 (3) |" in md and "| **better** |" in md
    assert "Spread far from the baseline's: reweighter=focal (" in md and "Student's t-interval" in md
    boot = write_report(tmp_path / "s", strategies, pick_baseline(strategies), tmp_path / "boot", method="bootstrap")
    assert "percentile bootstrap" in boot["markdown"]
    assert next(csv.DictReader(open(tmp_path / "boot" / "report.csv")))["interval"] == "bootstrap"


def test_plots_without_data_are_skipped(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path / "s" / str(seed), {}, [], seed, [5.0, 4.0])
    strategies = group_runs(find_runs(tmp_path / "s"))
    page = write_report(tmp_path / "s", strategies, strategies[0])
    assert sorted(page["files"]) == ["report.csv", "report.md", "val_curves.png"]
    md = page["markdown"]
    assert "Not drawn (no strategy has the data): domain weights, sample weights, selection rates." in md
    assert "No dynamic strategy" in md


def test_sweep_group_names_the_sweep_folder():
    assert sweep_group("multirun/2026-11-23/12-00-00") == "2026-11-23/12-00-00"
    assert sweep_group("/x/multirun/sweeps/mixers/v2") == "mixers/v2"


def test_labels_shorten_paths():
    from dataflex.report.runs import _short

    assert _short("mixer.weights=/o/sweeps/mixers/v6/$\\{trainer.seed\\}/mixture.json") == \
        "weights=v6/SEED/mixture.json"
    assert _short("mixer.reference=/o/multirun/sweeps/reference") == "reference=sweeps/reference"
    assert _short("+reweighter.anchor=prose") == "anchor=prose"


def test_real_sweep_with_a_target(tmp_path):
    """Two seeds of a real tiny run through Hydra's sweep, with a target set, then the CLI."""
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    fast = ["backend=torch", "logger=none", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.plot=false",
            "trainer.global_batch_size=8", "trainer.max_val_samples=8", "model.d_model=32", "model.seq_len=64"]
    subprocess.run([sys.executable, "launch/train.py", "-m", *fast, "+mixer=static", "trainer.seed=0,1",
                    f"+data.target.val={ROOT}/data/default/math/val.jsonl", f"hydra.sweep.dir={tmp_path}"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    metrics = [json.loads(x) for x in (tmp_path / "0" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 3, 6] and all(m["target_loss"] > 0 for m in evals)
    assert json.loads((tmp_path / "0" / "summary.json").read_text())["target_loss"] == evals[-1]["target_loss"]
    proc = subprocess.run([sys.executable, "launch/compare.py", str(tmp_path), "--out", str(tmp_path / "page")],
                          cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120)
    md = (tmp_path / "page" / "report.md").read_text()
    assert "**mixer=static** (baseline) | 2 |" in md and "| target |" in md
    assert "wrote" in proc.stdout and (tmp_path / "page" / "comparison.md").is_file()
    for name in ("report.csv", "val_curves.png", "domain_weights.png"):
        assert (tmp_path / "page" / name).is_file(), name


def test_pool_selectors_report_the_fraction_of_each_pool_kept(tmp_path):
    from dataflex.report.runs import Run
    (tmp_path / "data.json").write_text(json.dumps({"seq_len": 8, "names": ["a", "b"], "sizes": [100, 50],
                                                    "domains": []}))
    history = [{"step": 0, "selector/kept/a": 5, "selector/kept/b": 0},
               {"step": 1, "selector/kept/a": 10, "selector/kept/b": 25}, {"step": 1, "val_loss": {"a": 1.0}}]
    assert Run(tmp_path, {}, history).pool_kept() == {"a": 0.1, "b": 0.5}
    assert Run(tmp_path, {}, [{"step": 0, "train_loss": 1.0}]).pool_kept() == {}


def test_domain_names_with_tex_characters_plot(tmp_path):
    """A domain named like TeX (`$x_1$`, an unmatched `$`) is plotted as text, not parsed as mathtext."""
    from dataflex.run.outputs import plot_domain_weights

    history = [{"step": s, "domain_weights": {"$price$": 0.5, "a$b": 0.25, "x_1^2": 0.25}} for s in range(3)]
    out = plot_domain_weights(history, tmp_path / "w.png", title="$$")
    assert out is not None and (tmp_path / "w.png").stat().st_size > 0


def test_wall_times_are_compared_only_between_runs_made_alike(tmp_path):
    """A baseline logged to W&B and a strategy that logs nothing (the demo's case) differ in cost for reasons
    that are not the strategy's: the page says so and leaves the wall-time columns out; runs made alike keep
    them. Verdicts are Bonferroni-corrected by default and the CSV says at which level."""
    for seed in range(3):
        make_run(tmp_path / "s" / "v0" / str(seed), *STATIC[:2], seed, [5.0, 4.0, 3.0 + 0.01 * seed], wall=40.0)
        make_run(tmp_path / "s" / "v1" / str(seed), {"reweighter": "loss"}, ["+reweighter=loss"], seed,
                 [5.0, 4.0, 2.9 + 0.01 * seed], wall=20.0)
        make_run(tmp_path / "s" / "v2" / str(seed), {"reweighter": "focal"}, ["+reweighter=focal"], seed,
                 [5.0, 4.0, 2.95 + 0.011 * seed], wall=20.0)
    strategies = group_runs(find_runs(tmp_path / "s"))
    alike = write_report(tmp_path / "s", strategies, pick_baseline(strategies), tmp_path / "alike")["markdown"]
    assert "The runs were made alike" in alike and "| wall time s |" in alike
    row = next(csv.DictReader(open(tmp_path / "alike" / "report.csv")))
    assert float(row["diff_level"]) == pytest.approx(1 - 0.05 / 2) and row["cost_comparable"] == "True"
    assert "Bonferroni-corrected: each interval at 97.50%" in alike
    for seed in range(3):                    # the baseline's runs logged to W&B
        cfg_path = tmp_path / "s" / "v0" / str(seed) / "config.yaml"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["logger"] = {"name": "wandb"}
        cfg_path.write_text(yaml.safe_dump(cfg))
    strategies = group_runs(find_runs(tmp_path / "s"))
    md = write_report(tmp_path / "s", strategies, pick_baseline(strategies), tmp_path / "mixed",
                      correction="none")["markdown"]
    assert "Wall time is not compared here" in md and "logger.name: unset vs wandb" in md
    assert "| wall time s |" not in md and "overhead / step" not in md
    row = next(csv.DictReader(open(tmp_path / "mixed" / "report.csv")))
    assert row["cost_comparable"] == "False" and float(row["diff_level"]) == 0.95
