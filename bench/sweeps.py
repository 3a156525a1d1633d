"""The sweeps of the README: every reweighter, every mixer, against its baseline, three seeds.

    .venv/bin/python bench/sweeps.py reweighters [--out multirun/sweeps] [--steps 300] [--seeds 0 1 2]
    .venv/bin/python bench/sweeps.py mixers
    .venv/bin/python bench/sweeps.py mixers --table-only
    .venv/bin/python bench/sweeps.py selectors --target code     # the target: a domain's validation set
    # the benchmark corpus (data=bench, built on first use), as in the README's results:
    .venv/bin/python bench/sweeps.py mixers --data bench --out multirun/bench --steps 200 --eval-every 50 \
        --override trainer.max_val_samples=32

Runs (plain torch back end, the default model and corpus, validation every 25 steps):
  a reference run (uniform static mixture, checkpointed), which Rho-1 and DoReMi use as their
  reference model and Sheared-LLaMA as its reference losses;
  then one Hydra sweep per variant (seeds as the sweep), the baseline first;
then prints a markdown table: final per-domain and mean validation loss (mean ± std over seeds),
and the first evaluated step at which the run's mean validation loss reaches the baseline's final
mean (averaged over the seeds that reach it; "—" when none does). The results page with 95% intervals,
differences paired by seed and verdicts (better / worse / within noise) is `launch/compare.py OUT/FAMILY`.
New variants go last: the vI folders of a finished sweep keep their meaning, and a length-matched run
reads the selection of the run it matches (same seed) from that run's folder.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {
    "reweighters": {
        "none (unweighted)": [],
        "loss (linupper, r=0.4)": ["+reweighter=loss"],
        "tilted (t=1)": ["+reweighter=tilted"],
        "focal (gamma=2)": ["+reweighter=focal"],
        "anchor (prose)": ["+reweighter=anchor", "reweighter.anchor=prose"],
        "rho1 (keep 0.6)": ["+reweighter=rho1", "reweighter.reference={ref}"],
    },
    "selectors": {       # {target}: the target domain; every selector keeps 10% (of the pool, or of a 10x candidate batch)
        "random 10% of the pool": ["+selector=random", "selector.scope=pool", "selector.keep_fraction=0.1"],
        "none (all data)": [],
        "less (10% of the pool)": ["+selector=less", "selector.target={target}", "selector.keep_fraction=0.1"],
        "loss (top 10% of a batch)": ["+selector=loss", "selector.keep_fraction=0.1"],
        "rho (10% of a batch)": ["+selector=rho", "selector.reference={ref}", "selector.keep_fraction=0.1"],
        "gradnorm (GraNd, 10% of a batch)": ["+selector=gradnorm", "selector.keep_fraction=0.1"],
        "tracin (10% of a batch)": ["+selector=tracin", "selector.target={target}", "selector.keep_fraction=0.1"],
        "near (10% of the pool)": ["+selector=near", "selector.target={target}", "selector.keep_fraction=0.1"],
        "tsds (10% of the pool)": ["+selector=tsds", "selector.target={target}", "selector.keep_fraction=0.1"],
        "cluster_less (10% of the pool)": ["+selector=cluster_less", "selector.target={target}",
                                           "selector.keep_fraction=0.1"],
        # the baselines that re-tests of LESS-style selection found as strong as it: keyword retrieval, and
        # random with the selection's length histogram and token budget (after the run it matches, same seed)
        "bm25 (10% of the pool)": ["+selector=bm25", "selector.target={target}", "selector.keep_fraction=0.1"],
        "random length-matched to less": ["+selector=length_matched",
                                          "selector.reference={out}/selectors/v2/${{trainer.seed}}"],
        "random length-matched to near": ["+selector=length_matched",
                                          "selector.reference={out}/selectors/v7/${{trainer.seed}}"],
    },
    "mixers": {
        "static uniform": ["+mixer=static", "mixer.weights=uniform"],
        "none (size-proportional)": [],
        "bandit (ODM)": ["+mixer=bandit"],
        "ado": ["+mixer=ado"],
        "aioli": ["+mixer=aioli"],
        "sheared (clipped)": ["+mixer=sheared", "mixer.reference={ref}"],
        "doremi (proxy, apply=loss)": ["+mixer=doremi", "mixer.reference={ref}"],
        "static on doremi's mixture": ["+mixer=static", "mixer.weights={out}/mixers/v6/${{trainer.seed}}/mixture.json"],
        "static size^0.5 (UniMax/RegMix prior)": ["+mixer=static", "mixer.weights=size", "mixer.temperature=0.5"],
    },
}


def train(args: list, cwd: Path) -> None:
    env = dict(os.environ, WANDB_MODE="offline", DS_ACCELERATOR="cpu", HYDRA_FULL_ERROR="1")
    cmd = [sys.executable, str(cwd / "launch" / "train.py"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def run_all(family: str, out: Path, steps: int, seeds: list, cwd: Path, target: str = "code",
            only: list | None = None, data: str | None = None, eval_every: int = 25, extra: tuple = ()) -> None:
    common = ["backend=torch", "logger=none", "trainer.plot=false", f"trainer.max_steps={steps}",
              f"trainer.eval_every={eval_every}", *([f"data={data}"] if data else [])]
    ref = out / "reference"
    if not (ref / "summary.json").exists():
        plain = [e for e in extra if not e.startswith("selector.")]
        train([*common, *plain, "+mixer=static", "mixer.weights=uniform", f"trainer.checkpoint_every={steps}",
               f"hydra.run.dir={ref}"], cwd)
    for i, (name, variant) in enumerate(FAMILIES[family].items()):
        folder = out / family / f"v{i}"
        if len(list(folder.glob("*/summary.json"))) == len(seeds) or (only and i not in only):
            continue
        own = [e.format(ref=ref, out=out, target=target) for e in variant]
        given = [e for e in extra if e.split("=")[0].lstrip("+") in {o.split("=")[0].lstrip("+") for o in own}
                 or not e.startswith("selector.")]          # --override wins; a selector.* one only where it applies
        train(["-m", *common, *own, *given,
               f"trainer.seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={folder}",
               "hydra.sweep.subdir=${trainer.seed}"], cwd)


def evals(run_dir: Path) -> list:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["val_loss"]) for x in lines if "val_loss" in x]


def table(family: str, out: Path) -> str:
    names = list(FAMILIES[family])
    runs = {name: sorted((out / family / f"v{i}").glob("*/summary.json")) for i, name in enumerate(names)}
    base = [json.loads(p.read_text())["val_loss"] for p in runs[names[0]]]
    domains = list(base[0])
    base_final = statistics.mean(statistics.mean(b.values()) for b in base)
    rows = []
    for name, paths in runs.items():
        if not paths:
            continue
        finals = [json.loads(p.read_text())["val_loss"] for p in paths]
        cells = []
        for d in domains + ["mean"]:
            vals = [statistics.mean(f.values()) if d == "mean" else f[d] for f in finals]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        reach = []
        for p in paths:
            hit = [s for s, v in evals(p.parent) if statistics.mean(v.values()) <= base_final]
            reach.append(hit[0] if hit else None)
        reached = [r for r in reach if r is not None]
        steps = (f"{statistics.mean(reached):.0f}" + ("" if len(reached) == len(reach) else f" ({len(reached)}/{len(reach)} seeds)")
                 if reached else "—")
        rows.append([name, *cells, steps])
    head = [family[:-1], *domains, "mean", f"steps to {names[0]}'s final mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=sorted(FAMILIES))
    p.add_argument("--out", type=Path, default=ROOT / "multirun" / "sweeps")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--cwd", type=Path, default=ROOT, help="the checkout whose launch/train.py runs")
    p.add_argument("--target", default="code", help="selectors: the target domain (its validation set)")
    p.add_argument("--data", default=None, help="a data config (default: the embedded corpus)")
    p.add_argument("--only", type=int, nargs="+", default=None, help="run only these variant indices")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--override", action="append", default=[], help="a training override for every run (repeatable)")
    args = p.parse_args(argv)
    if not args.table_only:
        run_all(args.family, args.out.resolve(), args.steps, args.seeds, args.cwd.resolve(), args.target, args.only,
                args.data, args.eval_every, tuple(args.override))
    print(table(args.family, args.out.resolve()))


if __name__ == "__main__":
    main()
