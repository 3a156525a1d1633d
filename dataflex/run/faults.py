"""Fault injection for the kill-and-resume tests: DATAFLEX_FAULT=step:N or checkpoint:N (SIGKILL there), or
sigterm:N (a polite stop asked for inside step N, as a scheduler's SIGTERM would)."""
from __future__ import annotations

import os
import sys


def fault(point: str, step: int) -> None:
    """Tests: DATAFLEX_FAULT=step:N or checkpoint:N kills this process (SIGKILL) at that point."""
    spec = os.environ.get("DATAFLEX_FAULT", "")
    if spec and point == "step" and spec == f"sigterm:{step}" and int(os.environ.get("RANK", "0")) == 0:
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
        return
    if spec and spec == f"{point}:{step}" and int(os.environ.get("RANK", "0")) == 0:
        import signal

        sys.stdout.flush(), sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
