"""RegMix (Liu et al., ICLR 2025) end to end: sample mixtures, run the short proxy runs as one Hydra
sweep, fit the regression, write the mean of the top predicted mixtures as a static mixture file.

    python launch/regmix.py --mixtures 32 --steps 100 --out outputs/regmix
    python launch/regmix.py --mixtures 8 --steps 20 --out outputs/regmix -- model.d_model=64 data=mine
    python launch/train.py +mixer=static mixer.weights=outputs/regmix/mixture.json     # train on it

Arguments after `--` go to every proxy run (`launch/train.py` overrides). The proxies run as
`launch/train.py -m +mixer=static mixer.weights=MIX_0.json,MIX_1.json,...` in OUT/sweep (backend=torch,
logger=none, no plots, unless overridden). The regression target is the proxies' final mean
validation loss (`--target mean`) or one domain's (`--target DOMAIN`). `--reuse` refits from the
finished runs of an earlier OUT/sweep without training again. Writes OUT/mixtures/*.json (the
sampled mixtures), OUT/sweep/ (the runs), OUT/regmix.json (mixtures, losses, held-out Spearman) and
OUT/mixture.json (the result).

The mixtures follow the reference code (`dataflex/mixers/regmix.py`): Dirichlet around the domain
shares ** --temperature, concentrations from 15 log-spaced values in [0.1, 5], a 15x bound on the raw
share, weights below 2e-4 set to zero; the result is the mean of the top --top-k of --candidates plain
Dirichlet(shares) candidates. It works at any number of domains.

No mixture is written when the regression's held-out Spearman rank correlation (out-of-fold
predictions against the measured losses) is below --min-spearman (default 0.3) or cannot be measured
(fewer than 4 runs): the command exits with the figure, OUT/regmix.json still written. `--force`
writes it anyway, with the warning printed and stored in the file.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from dataflex.mixers.regmix import (  # noqa: E402
    MIN_SPEARMAN,
    fit_regression,
    heldout_spearman,
    regression_problem,
    sample_mixtures,
    temperature_prior,
    top_k_mixture,
    write_mixture,
)
from dataflex.mixers.static import load_mixture_file  # noqa: E402
from dataflex.utils.paths import configs_dir, share_root

PROXY_DEFAULTS = {"backend": "torch", "logger": "none", "trainer.plot": "false"}


def domain_sizes(overrides: list[str], config_dir: str | None) -> tuple[list[str], list[int]]:
    """Domain names and sample counts of the data config the proxies will train on."""
    from hydra import compose, initialize_config_dir

    from dataflex.data.domains import load_domains

    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] in ("data", "model")]
    if config_dir:
        keep.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    with initialize_config_dir(config_dir=str(configs_dir()), version_base=None):
        cfg = compose("train", overrides=keep)
    domains = load_domains(cfg.data, cfg.model.seq_len, 1)
    return list(domains.train), [len(s) for s in domains.train.values()]


def run_sweep(files: list[Path], args, overrides: list[str]) -> None:
    given = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    defaults = [f"{k}={v}" for k, v in {**PROXY_DEFAULTS, "trainer.max_steps": args.steps,
                                           "trainer.eval_every": args.steps, "trainer.seed": args.seed}.items()
                if k not in given]
    cmd = [sys.executable, "-m", "dataflex.recipes.train", "-m", "+mixer=static",
           "mixer.weights=" + ",".join(str(f.resolve()) for f in files),
           f"hydra.sweep.dir={(args.out / 'sweep').resolve()}"] + defaults + overrides
    if args.config_dir:
        cmd[2:2] = ["--config-dir", args.config_dir]
    print("regmix: proxy sweep:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=share_root())


def collect(sweep: Path, domains: list[str], target: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import yaml

    X, y, dirs = [], [], []
    for summary_path in sorted(sweep.glob("*/summary.json"), key=lambda p: int(p.parent.name)
                               if p.parent.name.isdigit() else 0):
        summary = json.loads(summary_path.read_text())
        cfg = yaml.safe_load((summary_path.parent / "config.yaml").read_text())
        weights = load_mixture_file(cfg["mixer"]["weights"])
        val = summary.get("val_loss") or {}
        if not val:
            continue
        if target == "mean":
            loss = sum(val.values()) / len(val)
        elif target in val:
            loss = val[target]
        else:
            raise SystemExit(f"regmix: --target {target!r} is not a domain of the runs ({sorted(val)})")
        X.append([weights.get(d, 0.0) for d in domains])
        y.append(loss)
        dirs.append(str(summary_path.parent))
    return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64), dirs


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/regmix"))
    parser.add_argument("--mixtures", type=int, default=32, help="proxy runs (the paper: 512)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of each proxy run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.5, help="prior: token shares ** temperature")
    parser.add_argument("--target", default="mean", help="'mean' validation loss or a domain's")
    parser.add_argument("--model", default="auto", choices=["auto", "lightgbm", "linear"])
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--top-k", type=int, default=128)
    parser.add_argument("--config-dir", default=None, help="a config folder for the proxies (as train.py's)")
    parser.add_argument("--reuse", action="store_true", help="refit from OUT/sweep without training")
    parser.add_argument("--min-spearman", type=float, default=MIN_SPEARMAN,
                        help="the held-out Spearman the regression must reach for a mixture to be written")
    parser.add_argument("--force", action="store_true",
                        help="write the mixture even when the regression fails --min-spearman (with a warning)")
    parser.add_argument("overrides", nargs="*", help="launch/train.py overrides for every proxy (after --)")
    args = parser.parse_args(argv)

    domains, sizes = domain_sizes(args.overrides, args.config_dir)
    prior = temperature_prior(sizes, args.temperature)
    if not args.reuse:
        mixtures = sample_mixtures(sizes, args.mixtures, seed=args.seed, temperature=args.temperature)
        files = [write_mixture(args.out / "mixtures" / f"mix_{i:04d}.json", domains, w)
                 for i, w in enumerate(mixtures)]
        run_sweep(files, args, args.overrides)
    X, y, dirs = collect(args.out / "sweep", domains, args.target)
    if len(X) < 2:
        raise SystemExit(f"regmix: {len(X)} finished proxy runs with validation loss in {args.out / 'sweep'}")
    model = fit_regression(X, y, args.model, args.seed)
    rho = heldout_spearman(X, y, args.model, seed=args.seed)
    problem = regression_problem(rho, args.min_spearman)
    best, predicted = top_k_mixture(model, sizes, args.candidates, min(args.top_k, args.candidates), seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regmix.json").write_text(json.dumps({
        "domains": domains, "prior": prior.tolist(), "runs": [
            {"dir": d, "mixture": x.tolist(), "loss": float(v), "fitted": float(model.predict(x[None])[0])}
            for d, x, v in zip(dirs, X, y)],
        "heldout_spearman": rho, "min_spearman": args.min_spearman, "problem": problem,
        "model": type(model).name, "mixture": best.tolist(), "predicted_loss": predicted}, indent=2) + "\n")
    figure = "n/a" if rho is None else f"{rho:.3f}"
    if problem and not args.force:
        (args.out / "mixture.json").unlink(missing_ok=True)          # no stale mixture from an earlier fit
        raise SystemExit(f"regmix: NO MIXTURE WRITTEN: {problem}. {len(X)} proxy runs, {type(model).name} model; "
                         f"the fit is in {args.out / 'regmix.json'}; --force writes the mixture anyway")
    if problem:
        print(f"regmix: WARNING: {problem}; writing the mixture anyway (--force)", file=sys.stderr, flush=True)
    out = write_mixture(args.out / "mixture.json", domains, best, predicted_loss=predicted, target=args.target,
                        model=type(model).name, proxy_runs=len(X), heldout_spearman=rho,
                        prior={d: float(p) for d, p in zip(domains, prior)},
                        **({"warning": problem} if problem else {}))
    print(f"regmix: {len(X)} proxy runs, {type(model).name} model, held-out Spearman {figure}; mixture "
          + ", ".join(f"{d}={w:.3f}" for d, w in zip(domains, best))
          + f" (predicted {args.target} loss {predicted:.4f})\n"
          f"  train on it: python launch/train.py +mixer=static mixer.weights={out}")
    return out


if __name__ == "__main__":
    main()
