"""Polite stops: SIGTERM (a scheduler's cancel or time limit) and SIGINT (Ctrl-C) end a run at a step
boundary instead of mid-write.

`PoliteStop.install()` turns the first signal into a request: the current step finishes, then the training
loop flushes the ledger and metrics, writes a checkpoint (when `trainer.checkpoint_every` > 0 and
`trainer.checkpoint_on_signal`), writes `summary.json` marked `interrupted`, and exits with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT). A second signal stops at once (the default action). With several
ranks, `should_stop()` is agreed on by all of them (one all-reduce of a flag a step), so every rank stops
after the same step and the checkpoint's collectives match.

`forward_signals(proc)` is the rank launcher's half: SIGTERM/SIGINT sent to it go to the process group of
the ranks it started, and it waits for them.

A launcher killed outright (`kill -9`, an OOM kill) forwards nothing. The ranks notice: `watch_launcher()`
runs a thread in every rank that polls, once a second, its parent (the DeepSpeed launcher or torchrun) and the
dataflex process that started the job (`DATAFLEX_LAUNCHER_PID`, with its start time against pid reuse); when
one is gone it sends its own rank SIGTERM (the polite stop above) and, if the rank is still alive
`ORPHAN_GRACE_S` later (a collective waiting for a peer that died), ends it. The launcher dataflex starts
itself also gets `PR_SET_PDEATHSIG` = SIGTERM (Linux), so it goes when the dataflex process goes.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PoliteStop:
    def __init__(self):
        self.signum = None
        self._previous = {}

    @classmethod
    def install(cls) -> "PoliteStop":
        stop = cls()
        for s in SIGNALS:
            try:
                stop._previous[s] = signal.signal(s, stop._handle)
            except ValueError:      # not the main thread: leave signals alone
                pass
        return stop

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:       # a second Ctrl-C: stop now (a repeated SIGTERM, e.g. from a rank
            if signum != signal.SIGINT:   # launcher passing the scheduler's on, changes nothing)
                return
            self.uninstall()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\ndataflex: {signal.Signals(signum).name} received: finishing this step, then saving and stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for s, old in self._previous.items():
            try:
                signal.signal(s, old if old is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def should_stop(self) -> bool:
        """Whether to stop after this step; with several ranks, true on all of them if any got a signal."""
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([0 if self.signum is None else int(self.signum)])
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if int(flag.item()) and self.signum is None:
                self.signum = int(flag.item())
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


    def record(self, step: int, max_steps: int, run_dir, checkpoint_every: int) -> dict:
        """What summary.json says about the stop: the signal, the steps done of the planned, the checkpoint."""
        from pathlib import Path

        ckpt = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
        return {"signal": self.name, "steps_done": step, "max_steps": max_steps,
                "checkpoint": str(ckpt) if checkpoint_every and ckpt.is_dir() else None}

    def exit_if_requested(self, step: int) -> None:
        if self.requested:
            import torch

            rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_rank() == 0
            if rank0:
                print(f"dataflex: stopped by {self.name} after step {step}; continue with trainer.resume=latest "
                      f"(exit {self.exit_code})", file=sys.stderr, flush=True)
            raise SystemExit(self.exit_code)


def forward_signals(proc) -> tuple:
    """Wait for `proc` (started with `start_new_session=True`), passing SIGTERM/SIGINT on to its whole
    process group (the rank launcher and every rank); returns (its exit code, the signals received)."""
    received = []

    def handle(signum, frame):
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        while True:
            try:
                return proc.wait(), received
            except KeyboardInterrupt:
                continue
    finally:
        for s, old in previous.items():
            signal.signal(s, old)



ORPHAN_GRACE_S = 20.0       # after the launcher died: time for the polite stop before the rank ends at once
LAUNCHER_ENV = "DATAFLEX_LAUNCHER_PID"      # "PID:START" of the dataflex process that started the ranks


def process_start(pid: int):
    """(start time in clock ticks, state letter) of a process from /proc; None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19], fields[0]
    except (OSError, IndexError):
        if os.path.isdir("/proc"):
            return None
        try:                    # no /proc: alive or not, and nothing more
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "", "R"


def launcher_env() -> str:
    """The value of DATAFLEX_LAUNCHER_PID for the ranks this process starts."""
    info = process_start(os.getpid())
    return f"{os.getpid()}:{info[0] if info else ''}"


def _gone(pid: int, start: str) -> bool:
    info = process_start(pid)
    return info is None or info[1] in ("Z", "X") or bool(start and info[0] and info[0] != start)


def die_with_parent(sig: int = signal.SIGTERM):
    """A `preexec_fn` that sets prctl(PR_SET_PDEATHSIG, sig) in the child (Linux; None elsewhere): the rank
    launcher dataflex starts gets `sig` when the dataflex process dies. libc's prctl is looked up here, in the
    parent, so the child after fork only makes the call; the signal follows the thread that forked (the main
    one here)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(sig), 0, 0, 0)      # PR_SET_PDEATHSIG = 1


def watch_launcher(grace_s: float = None, poll_s: float = 1.0):
    """In a rank started by a launcher (RANK or LOCAL_RANK set): a daemon thread that stops this rank when its
    parent or the dataflex process that started the job dies (see the module docstring). Returns the thread."""
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    grace = float(os.environ.get("DATAFLEX_ORPHAN_GRACE_S", ORPHAN_GRACE_S)) if grace_s is None else grace_s
    parent = os.getppid()
    watched = []
    if parent > 1:
        info = process_start(parent)
        watched.append((parent, info[0] if info else ""))
    spec = os.environ.get(LAUNCHER_ENV, "")
    if spec.split(":")[0].isdigit() and int(spec.split(":")[0]) not in (parent, os.getpid()):
        pid, _, start = spec.partition(":")
        watched.append((int(pid), start))
    if not watched:
        return None

    def run():
        while True:
            dead = next((pid for pid, start in watched if _gone(pid, start)), None)
            if dead is None and (parent <= 1 or os.getppid() == parent):
                time.sleep(poll_s)
                continue
            who = dead if dead is not None else parent
            try:
                print(f"dataflex: rank {os.environ.get('RANK', '?')}: its launcher (pid {who}) is gone (killed?): "
                      "stopping this rank", file=sys.stderr, flush=True)
            except (OSError, ValueError):       # its stderr went with the launcher
                pass
            os.kill(os.getpid(), signal.SIGTERM)        # the polite stop, or the default action before the loop
            time.sleep(grace)
            os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=run, name="dataflex-launcher-watch", daemon=True)
    thread.start()
    return thread
