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
"""
from __future__ import annotations

import os
import signal
import sys

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

