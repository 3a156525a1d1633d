"""What a run leaves behind: config.yaml, metrics.jsonl, the ledger, data.json + samples.parquet, summary.json,
domain_weights.png and a W&B run. Only rank 0 writes; every file is usable while the run goes on.

The ledger is a folder of Parquet parts, one per flush (`ledger/part-<first>-<last>.parquet`), so a
crash loses at most the rows since the last flush and `pandas.read_parquet("ledger")` reads it whole.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

LEDGER_SCHEMA = pa.schema([("step", pa.int64()), ("rank", pa.int64()), ("row", pa.int64()), ("sample_id", pa.int64()),
                           ("domain", pa.string()), ("selected", pa.bool_()), ("weight", pa.float64()),
                           ("loss", pa.float64())])


class RunOutputs:
    def __init__(self, run_dir: str | Path, enabled: bool = True, flush_every: int = 50, wandb_run=None):
        self.dir = Path(run_dir)
        self.enabled, self.flush_every, self.wandb = enabled, flush_every, wandb_run
        self.history: list[dict] = []
        self._ledger: dict = {k: [] for k in LEDGER_SCHEMA.names}
        self._ledger_steps: list[int] = []
        self._drawn: set = set()          # sample ids in the ledger: samples.parquet lists these at the end
        self._resolve_samples = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "ledger").mkdir(exist_ok=True)
            metrics = self.dir / "metrics.jsonl"   # a resume into its own folder continues its history
            if metrics.exists():
                self.history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]

    def write_config(self, cfg_container: dict) -> None:
        if self.enabled:
            import yaml
            (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg_container, sort_keys=False))

    def write_samples(self, table: dict) -> None:
        if self.enabled:
            pq.write_table(pa.table(table), self.dir / "samples.parquet")

    def track_samples(self, description: dict, resolve) -> None:
        """data.json (how any sample id resolves to its source, for launch/where.py) now; samples.parquet
        for the samples drawn (`resolve(ids)` -> its columns) when the run finishes: O(rows drawn)."""
        self._resolve_samples = resolve
        if self.enabled:
            (self.dir / "data.json").write_text(json.dumps(description, indent=1))

    def log(self, record: dict) -> None:
        """One metrics line; a step record's `ledger` rows go to the ledger instead."""
        record = dict(record)
        rows = record.pop("ledger", None)
        self.history.append(record)
        if not self.enabled:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if rows:
            self._drawn.update(rows["sample_id"])
            for k in LEDGER_SCHEMA.names:
                self._ledger[k].extend(rows[k])
            self._ledger_steps.append(record["step"])
            if len(self._ledger_steps) >= self.flush_every:
                self.flush()
        if self.wandb is not None:
            self.wandb.log(flatten_for_wandb(record), step=record["step"])

    def last(self, key: str):
        return next((r[key] for r in reversed(self.history) if key in r), None)

    def flush(self) -> None:
        if not self.enabled or not self._ledger_steps:
            return
        first, last = self._ledger_steps[0], self._ledger_steps[-1]
        path = self.dir / "ledger" / f"part-{first:07d}-{last:07d}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.table(self._ledger, schema=LEDGER_SCHEMA), tmp)
        os.replace(tmp, path)
        self._ledger = {k: [] for k in LEDGER_SCHEMA.names}
        self._ledger_steps = []

    def finish(self, summary: dict, plot: bool = True) -> None:
        self.flush()
        if not self.enabled:
            return
        if self._resolve_samples is not None and self._drawn:
            if (self.dir / "samples.parquet").exists():  # a resumed run: keep the samples drawn before
                self._drawn.update(pq.read_table(self.dir / "samples.parquet", columns=["sample_id"])["sample_id"]
                                   .to_pylist())
            self.write_samples(self._resolve_samples(sorted(self._drawn)))
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if plot:
            plot_domain_weights(self.history, self.dir / "domain_weights.png", strategy_label(summary["strategy"]))
        if self.wandb is not None:
            self._wandb_weight_chart()
            self.wandb.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
            self.wandb.finish()

    def _wandb_weight_chart(self) -> None:
        """All domains' weights in one W&B chart (the per-key line charts come with every log)."""
        import wandb

        steps = [r for r in self.history if "domain_weights" in r]
        if steps:
            domains = list(steps[-1]["domain_weights"])
            chart = wandb.plot.line_series(xs=[r["step"] for r in steps], keys=domains, title="domain weights",
                                           ys=[[r["domain_weights"][d] for r in steps] for d in domains], xname="step")
            self.wandb.log({"domain_weights_chart": chart})


def truncate_run(run_dir: Path, step: int) -> None:
    """Drop what a run folder recorded from `step` on (metrics lines, ledger rows, the summary), so a
    resume from its checkpoint at `step` continues the folder without repeating steps."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if _before(json.loads(line), step)]
        tmp = metrics.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, metrics)
    for part in sorted((run_dir / "ledger").glob("part-*.parquet")):
        first, last = (int(x) for x in part.stem.split("-")[1:3])
        if first >= step:
            part.unlink()
        elif last >= step:
            table = pq.read_table(part)
            keep = table.filter(pa.compute.less(table["step"], step))
            steps = sorted(set(keep["step"].to_pylist()))
            part.unlink()
            if steps:
                pq.write_table(keep, part.with_name(f"part-{steps[0]:07d}-{steps[-1]:07d}.parquet"))
    for name in ("summary.json", "domain_weights.png"):
        if (run_dir / name).exists():
            (run_dir / name).unlink()


def _before(record: dict, step: int) -> bool:
    """A metrics line the checkpoint at `step` covers: steps before it, and the evaluation logged at `step`
    itself (after step `step - 1` trained, before the checkpoint was written)."""
    return record["step"] < step or (record["step"] == step and "train_loss" not in record)


def strategy_label(strategy: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in strategy.items() if v) or "size-proportional, no plugins"


def flatten_for_wandb(record: dict) -> dict:
    flat = {}
    for k, v in record.items():
        if isinstance(v, dict):
            flat.update({f"{k}/{d}": x for d, x in v.items()})
        elif isinstance(v, (int, float)) and k != "step":
            flat[k] = v
    return flat


def plot_domain_weights(history: list[dict], path: Path, title: str = "") -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False     # domain names are text: `$x$` is not TeX
    import matplotlib.pyplot as plt

    steps = [r for r in history if "domain_weights" in r]
    evals = [r for r in history if "val_loss" in r]
    if not steps:
        return None
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    for d in steps[0]["domain_weights"]:
        ax.plot([r["step"] for r in steps], [r["domain_weights"][d] for r in steps], label=d)
    ax.set(xlabel="step", ylabel="domain weight", title=f"domain weights ({title})" if title else "domain weights",
           ylim=(0, None))
    ax.legend()
    if evals:
        ax = axes[0][1]
        for d in evals[-1]["val_loss"]:
            pts = [(r["step"], r["val_loss"][d]) for r in evals if d in r["val_loss"] and math.isfinite(r["val_loss"][d])]
            ax.plot(*zip(*pts), marker="o", label=d)
        ax.set(xlabel="step", ylabel="validation loss", title="per-domain validation loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def start_wandb(cfg, run_dir: Path, strategy: dict, run_id: Optional[str] = None):
    """A W&B run (offline unless logger.mode says otherwise) with domain weights as charts. `run_id`: the W&B
    run a resumed training continues (kept in its checkpoint), so the dashboard shows one run, not two."""
    if cfg.logger.name != "wandb":
        return None
    import wandb
    from omegaconf import OmegaConf

    mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
    name = "+".join(f"{k}={v}" for k, v in strategy.items() if v) or "baseline"
    group = cfg.logger.get("group") or sweep_group()
    resume = {"id": str(run_id), "resume": "allow"} if run_id else {}
    return wandb.init(project=cfg.logger.project, group=group, name=name, mode=mode,
                      dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
                      **resume)


def sweep_group(sweep_dir=None) -> Optional[str]:
    """A sweep job's W&B group: its sweep folder's last two parts (`2026-11-23/12-00-00`, `mixers/v2`), so the
    jobs of one `launch/train.py -m` land together; None outside a sweep (or `sweep_dir` given for tests)."""
    if sweep_dir is None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return os.environ.get("DATAFLEX_SWEEP_GROUP") or None   # a job's ranks (launch_ranks) inherit it
        sweep_dir = HydraConfig.get().sweep.dir
    return "/".join(Path(str(sweep_dir)).parts[-2:]) or None


def print_comparison(summary: dict) -> None:
    start, end, weights = summary["val_loss_initial"], summary["val_loss"] or {}, summary["domain_weights"] or {}
    used = strategy_label(summary["strategy"])
    print(f"\n{used}: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['wall_time_s']:.0f} s")
    print(f"{'domain':<12}{'val loss start':>16}{'val loss end':>14}{'final weight':>14}")
    for d in weights:
        print(f"{d:<12}{start.get(d, float('nan')):>16.3f}{end.get(d, float('nan')):>14.3f}{weights[d]:>14.3f}")
    print(f"outputs: {summary['run_dir']}")
