"""Shared helpers of the benchmarks: data, the model shape, timing, memory and table printing.

Nothing here asserts on time: benchmarks print and save, they never fail because a machine is slow.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA_CONFIG = ROOT / "configs" / "data" / "default.yaml"
BENCH_DATA_CONFIG = ROOT / "configs" / "data" / "bench.yaml"    # the benchmark corpus (data=bench), built on first use
THREADS = 2
MODEL = dict(d_model=128, n_layers=2, n_heads=4)      # TinyGPT shape used by every benchmark

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def setup_torch():
    import torch
    torch.set_num_threads(THREADS)
    return torch


_DOMAINS = {}


def load_domains(seq_len: int = 128, config: Path = DATA_CONFIG):
    """A data config's domains (the default corpus unless `config` names another), tokenized once per process
    (paths in the config are relative to the repo)."""
    key = (seq_len, str(config))
    if key not in _DOMAINS:
        from omegaconf import OmegaConf

        import dataflex
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            _DOMAINS[key] = dataflex.data.domains.load_domains(OmegaConf.load(config), seq_len=seq_len)
        finally:
            os.chdir(cwd)
    return _DOMAINS[key]


def median_ms(seconds) -> float:
    return 1000.0 * statistics.median(seconds) if seconds else float("nan")


class Clock:
    """perf_counter laps: `lap(name)` adds the time since the previous lap to `name`."""

    def __init__(self):
        self.t = time.perf_counter()
        self.parts: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + now - self.t
        self.t = now


# -- memory: peak resident set of one call, from the kernel's high-water mark ---------------------
_LIBC = None


def _trim() -> None:
    """Give freed heap pages back to the OS so that the next peak is measured from a clean base."""
    global _LIBC
    gc.collect()
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def measure_peak(fn):
    """(result, seconds, peak RSS increase in MiB over the RSS just before the call, or None).

    Linux only: writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS.
    torch's CPU allocator is plain malloc, so after malloc_trim this sees every tensor it allocates.
    """
    _trim()
    ok = peak_rss_supported()
    base = _status_kib("VmRSS") if ok else 0
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - base) / 1024.0 if ok else None
    return result, seconds, peak


# -- environment and output ------------------------------------------------------------------------
def command_line() -> str:
    exe = sys.executable
    try:
        rel = os.path.relpath(exe, os.getcwd())
        if not rel.startswith(".."):
            exe = rel
    except ValueError:
        pass
    return shlex.join([exe] + sys.argv)


def environment() -> dict:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "cpu": cpu, "commit": commit,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(ms) -> str:
    if ms is None or ms != ms:
        return "—"
    return f"{ms:,.0f}" if ms >= 1000 else f"{ms:.1f}"


def fmt_ratio(r) -> str:
    if r is None or r != r:
        return "—"
    return f"{r:,.0f}×" if r >= 100 else f"{r:.2f}×"


def save_json(name: str, payload: dict) -> Path:
    """Write bench/results/NAME; every results file carries its environment (date, commit, machine) and the
    load average when it was saved, so that a figure copied from it says where it came from."""
    payload = dict(payload)
    if "env" not in payload and "environment" not in payload:
        payload["env"] = environment()
    payload.setdefault("loadavg_at_save", os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
