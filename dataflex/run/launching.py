"""What makes a Hydra app behave under the DeepSpeed launcher and torchrun.

The launcher appends `--local_rank=N`, which Hydra rejects: it is moved into LOCAL_RANK. Ranks
other than 0 must not each make a timestamped run directory or log file: they run with Hydra's
outputs turned off and learn rank 0's run directory by broadcast once the process group exists.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dataflex.run.checkpoints import checkpoint_run_folder
from dataflex.run.config import _override_key, config_file  # noqa: F401  (config_file: re-exported)
from dataflex.run.lock import LOCK_NAME
from dataflex.utils.dist import free_port
from dataflex.utils.errors import RunError

_VALUE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")
_DEEPSPEED_CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config")   # -> backend.config=PATH


def prepare_argv(argv: list[str]) -> list[str]:
    """Drop the launcher's --local_rank, turn DeepSpeed's `--deepspeed_config PATH` into
    `backend.config=PATH`, and put Hydra's flags before the overrides (argparse rejects
    `a=1 --config-dir DIR b=2`, which users type)."""
    out, flags, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        elif arg in _DEEPSPEED_CONFIG_FLAGS and i + 1 < len(argv):    # the launcher's convention
            out.append(f"backend.config={os.path.abspath(argv[i + 1])}")
            i += 1
        elif arg.split("=", 1)[0] in _DEEPSPEED_CONFIG_FLAGS and "=" in arg:
            out.append(f"backend.config={os.path.abspath(arg.split('=', 1)[1])}")
        elif arg == "--deepspeed":           # DeepSpeed's "use DeepSpeed" switch: backend=deepspeed is the default
            pass
        elif arg in _VALUE_FLAGS and i + 1 < len(argv):
            flags += [arg, argv[i + 1]]
            i += 1
        elif arg.split("=", 1)[0] in _VALUE_FLAGS:
            flags.append(arg)
        else:
            out.append(arg)
        i += 1
    out = flags + out
    if int(os.environ.get("RANK", "0")) == 0 and not any(a in ("-m", "--multirun") for a in out):
        given = [a.split("=", 1)[1] for a in out if a.startswith("hydra.run.dir=")]
        if given:     # a folder a running training holds: refused before Hydra writes into it
            from dataflex.run.lock import check_not_running

            try:
                check_not_running(given[-1])
            except RunError as e:
                print(f"train: error: {e}", file=sys.stderr)
                sys.exit(2)
    if int(os.environ.get("RANK", "0")) > 0:
        given = [a.split("=", 1)[1] for a in out if a.startswith("hydra.run.dir=")]
        if given:  # rank 0's run folder, for trainer.resume=latest
            os.environ.setdefault("DATAFLEX_RUN_DIR", given[-1])
        if any(a in ("-m", "--multirun") for a in out):
            sys.exit("a sweep (-m) must run from one process: `python launch/train.py -m ...`; "
                     "add trainer.nprocs=N to launch each job on N processes")
        out += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled"]
    return out


def needs_launch(nprocs: int) -> bool:
    """True in the one process that should start `nprocs` ranks itself (a sweep job, or a plain
    `python launch/train.py trainer.nprocs=2`); false under a launcher."""
    return nprocs > 1 and "LOCAL_RANK" not in os.environ and "RANK" not in os.environ


def launch_ranks(script: str, nprocs: int, backend: str) -> None:
    """Run this Hydra job again on `nprocs` processes (DeepSpeed's launcher, or torchrun), in the
    same run directory, and wait for it: the outer process is the sweep, the ranks are the job."""
    import subprocess

    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.startswith("hydra.run.dir=")]
    overrides += [f"hydra.run.dir={hc.runtime.output_dir}", "hydra.output_subdir=null"]
    bindir = os.path.dirname(sys.executable)
    if backend == "deepspeed":
        cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()), script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nprocs), script]
    config_dir = next((s.path for s in hc.runtime.config_sources if s.provider == "command-line"), None)
    flags = ["--config-dir", config_dir] if config_dir else []
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    from dataflex.run.outputs import sweep_group

    env["DATAFLEX_MEMORY_CHECKED"] = "1"     # on CPU this process checked the memory for every rank
    group = sweep_group()
    if group:   # the ranks run outside Hydra's sweep: they learn its W&B group from here
        env["DATAFLEX_SWEEP_GROUP"] = group
    from dataflex.run.stopping import LAUNCHER_ENV, die_with_parent, forward_signals, launcher_env

    env[LAUNCHER_ENV] = launcher_env()      # the ranks watch this process: a kill -9 of it stops them
    proc = subprocess.Popen(cmd + flags + overrides, env=env, start_new_session=True, preexec_fn=die_with_parent())
    code, received = forward_signals(proc)        # SIGTERM / Ctrl-C reach every rank; we wait for them
    if received:
        raise SystemExit(128 + int(received[0]))
    if code:
        raise subprocess.CalledProcessError(code, cmd)


# ---------------------------------------------------------------- a run's first minutes (issue 12)



# Settings that never change what the model sees or how it learns: a resume may change them freely.
SAFE_ON_RESUME = ("logger", "trainer.resume", "trainer.overwrite", "trainer.checkpoint_every", "trainer.plot",
                  "trainer.ledger_flush_every", "trainer.eval_every", "trainer.max_val_samples",
                  "trainer.check_ranks_every", "trainer.memory_check")
# Run folder entries a finished or running training writes; a fresh run never mixes with them.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "samples.parquet", "data.json", "ledger", "domain_weights.png",
             "wandb", "checkpoints", ".failed")


def resume_config(cfg, overrides: list[str], ckpt) -> tuple:
    """The resumed run's own config (RUN_DIR/config.yaml) with only the overrides given on this command
    line applied. Returns (config, notes): notes name every given override that changes the run's
    trajectory (anything but logging, evaluation and checkpoint settings)."""
    from omegaconf import OmegaConf

    folder = checkpoint_run_folder(ckpt)
    if folder is None:
        return cfg, [f"resume: {ckpt} has no RUN_DIR/config.yaml beside it; using this command line's config"]
    saved = OmegaConf.load(folder / "config.yaml")
    merged = OmegaConf.create(OmegaConf.to_container(saved))
    for group in ("trainer", "logger"):   # settings added to dataflex since that run: today's defaults
        for k, v in (cfg.get(group) or {}).items():
            if group in merged and k not in merged[group]:
                merged[group][k] = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
    notes, missing = [], object()
    for override in overrides:
        key, deleted = _override_key(override)
        if key.startswith("hydra.") or key == "hydra":
            continue
        old = OmegaConf.select(saved, key, default=missing)
        new = missing if deleted else OmegaConf.select(cfg, key, default=missing)
        if deleted:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(merged, parent) if parent else merged
            if node is not None and leaf in node:
                node.pop(leaf)
        else:
            value = OmegaConf.to_container(new, resolve=True) if OmegaConf.is_config(new) else new
            OmegaConf.update(merged, key, value, force_add=True, merge=False)
        plain = [OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for v in (old, new)]
        if plain[0] != plain[1] and not any(key == s or key.startswith(s + ".") for s in SAFE_ON_RESUME):
            show = ["(absent)" if v is missing else v for v in plain]
            notes.append(f"resume: {key}={show[1]} differs from the run's {key}={show[0]} "
                         f"({folder / 'config.yaml'}): the continuation will not match an uninterrupted run")
    OmegaConf.update(merged, "trainer.resume", str(ckpt), force_add=True)
    return merged, notes


def saved_choices(ckpt) -> dict:
    """The config-group choices (mixer=bandit, ...) of the run a checkpoint belongs to."""
    folder = checkpoint_run_folder(ckpt)
    hydra_yaml = folder / ".hydra" / "hydra.yaml" if folder else None
    if hydra_yaml is None or not hydra_yaml.is_file():
        return {}
    import yaml

    with open(hydra_yaml) as f:
        return dict(((yaml.safe_load(f) or {}).get("hydra", {}).get("runtime", {}) or {}).get("choices") or {})


def prepare_run_dir(run_dir, own_resume_step: int | None, overwrite: bool) -> bool:
    """Make the run folder fit for this run. Returns True if it held nothing but Hydra's own files
    (so a run that fails before training may remove it again).

    A fresh run into a folder holding another run's outputs refuses (or, with trainer.overwrite=true,
    removes them first): it never appends to their metrics, ledger or W&B run. A resume into its own
    folder keeps what came before its checkpoint and drops what came after it."""
    import shutil

    present = sorted(p.name for p in run_dir.iterdir() if p.name in RUN_FILES) if run_dir.is_dir() else []
    fresh = run_dir.is_dir() and all(p.name in (".hydra", "train.log", LOCK_NAME) for p in run_dir.iterdir())
    if not present:
        return fresh
    if own_resume_step is None and not overwrite and is_failed_run(run_dir):
        print(f"note: {run_dir} holds only a failed run's outputs ({', '.join(present)}; no checkpoint, no "
              f"summary.json); reusing it", file=sys.stderr)
        overwrite = True
    if own_resume_step is not None:
        from dataflex.run.outputs import truncate_run

        truncate_run(run_dir, own_resume_step)
        return False
    if not overwrite:
        raise RunError(f"{run_dir} already holds a run ({', '.join(present)}); a new run never mixes with it: "
                       "choose another hydra.run.dir, continue it with trainer.resume=latest, or start it over "
                       "with trainer.overwrite=true")
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log = run_dir / "train.log"
    if log.exists():
        log.write_text("")
    return False


def port_clash_message(exc: BaseException) -> str | None:
    """One line for `address already in use` when joining the process group, naming --master_port."""
    text = str(exc)
    if "EADDRINUSE" not in text and "ddress already in use" not in text:
        return None
    port = os.environ.get("MASTER_PORT", "29500")
    return (f"port {port} (MASTER_PORT) is already in use by another process (EADDRINUSE): pick another with "
            f"`deepspeed --master_port {free_port()} launch/train.py ...` (torchrun: --master_port; "
            f"plain python: MASTER_PORT=N)")


def run_strategy(cfg, hc, ckpt, groups) -> dict:
    """{group: choice} of the plugin groups in use; a resume takes its run's choices for groups not
    chosen on this command line."""
    saved = {}
    if ckpt is not None:
        from dataflex.run.checkpoints import checkpoint_info

        saved = checkpoint_info(ckpt).get("strategy") or saved_choices(ckpt)
    out = {}
    for g in groups:
        choice = hc.runtime.choices.get(g) or saved.get(g)
        if not choice and cfg.get(g):  # no record of the name: the plugin's class
            choice = str(cfg[g].get("_target_", g)).rsplit(".", 1)[-1].lower()
        out[g] = choice if cfg.get(g) else None
    return out


FAILED_MARK = ".failed"      # written into the folder of a run that failed: its retry may reuse the folder


def is_failed_run(run_dir) -> bool:
    """A folder whose run failed (its mark) and left nothing to continue from: no summary.json, no complete
    checkpoint. A run killed outright leaves no mark and keeps its folder for the user to judge."""
    from dataflex.run.checkpoints import complete_checkpoints

    run_dir = Path(run_dir)
    return ((run_dir / FAILED_MARK).is_file() and not (run_dir / "summary.json").exists()
            and not complete_checkpoints(run_dir / "checkpoints"))


def mark_failed_run(run_dir, error: str = "") -> None:
    """After a failure: a folder still holding the run's outputs but nothing to continue from is marked, so
    the retry into it (the same command, fixed) is not refused as a folder that holds a run."""
    import json
    import time

    from dataflex.run.checkpoints import complete_checkpoints

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / "summary.json").exists() or complete_checkpoints(run_dir / "checkpoints"):
        return
    try:
        (run_dir / FAILED_MARK).write_text(json.dumps({"failed_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                       "error": error[-500:]}) + "\n")
    except OSError:
        pass


def remove_failed_run(run_dir, explicit: bool) -> None:
    """A run that failed before its first step removes the folder Hydra made for it (and the date folder
    above, if now empty and the path was Hydra's default): no empty timestamped folders pile up."""
    import shutil

    if (run_dir / "metrics.jsonl").exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    if not explicit:   # outputs/DATE/TIME: DATE, then outputs, if this run was all they held
        for folder in (run_dir.parent, run_dir.parent.parent):
            try:
                folder.rmdir()
            except OSError:
                break


