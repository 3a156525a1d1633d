"""What makes a Hydra app behave under the DeepSpeed launcher and torchrun.

The launcher appends `--local_rank=N`, which Hydra rejects: it is moved into LOCAL_RANK. Ranks
other than 0 must not each make a timestamped run directory or log file: they run with Hydra's
outputs turned off and learn rank 0's run directory by broadcast once the process group exists.
"""
from __future__ import annotations

import os
import sys


_VALUE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")


def prepare_argv(argv: list[str]) -> list[str]:
    """Drop the launcher's --local_rank, and put Hydra's flags before the overrides (argparse
    rejects `a=1 --config-dir DIR b=2`, which users type)."""
    out, flags, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        elif arg in _VALUE_FLAGS and i + 1 < len(argv):
            flags += [arg, argv[i + 1]]
            i += 1
        elif arg.split("=", 1)[0] in _VALUE_FLAGS:
            flags.append(arg)
        else:
            out.append(arg)
        i += 1
    out = flags + out
    if int(os.environ.get("RANK", "0")) > 0:
        if any(a in ("-m", "--multirun") for a in out):
            sys.exit("a sweep (-m) must run from one process: `python launch/train.py -m ...`; "
                     "add trainer.nprocs=N to launch each job on N processes")
        out += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled"]
    return out


def config_file(group: str) -> str:
    """The YAML file Hydra chose for a config group, for error messages."""
    from hydra.core.hydra_config import HydraConfig

    runtime = HydraConfig.get().runtime
    choice = runtime.choices.get(group)
    for source in runtime.config_sources:
        if source.provider in ("main", "command-line") and source.schema == "file":
            path = os.path.join(source.path, group, f"{choice}.yaml")
            if os.path.exists(path):
                return path
    return f"{group}={choice}"


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
    subprocess.run(cmd + flags + overrides, check=True, env=env)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
