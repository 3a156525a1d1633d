"""The committed comparison protocol (bench/protocol.yaml): every strategy of every family, every seed, then
one results page per family, from one command that starts from nothing and resumes when interrupted.

    .venv/bin/python bench/protocol.py                  # run what is missing (2 runs at a time), then the pages
    .venv/bin/python bench/protocol.py --jobs 1         # one run at a time
    .venv/bin/python bench/protocol.py --pages-only     # re-make the pages from the runs there are
    .venv/bin/python bench/protocol.py --seeds 0 1 2 3 4    # more seeds than the protocol's (same pages)

A run is done when its folder holds summary.json; an interrupted one continues from its last checkpoint
(`trainer.resume=latest`), or starts over in its own folder when it had none. Runs go family by family and,
in a family, seed by seed (every strategy's seed 0 first), so an interrupted protocol leaves the strategies of a
family with the same seeds; a run whose folder is locked by a live process (another protocol.py) is waited for. A run that
needs another (the reference model, DoReMi's mixture, the selection a length-matched run copies) waits for it.
The pages: `launch/compare.py OUT/FAMILY --out PAGES --baseline B` (intervals, differences paired by seed,
verdicts) into the protocol's `pages` folder of each family, and its `provenance` file (date, commit, machine,
load, each run's wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweeps import FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Task:
    def __init__(self, key, folder: Path, args: list, deps: list):
        self.key, self.folder, self.args, self.deps = key, folder, args, deps
        self.copy_of = None       # a task with the same overrides: its run is copied, not made again

    def done(self) -> bool:
        """Finished: summary.json, not marked `interrupted` (a run stopped by a signal writes one so marked)."""
        path = self.folder / "summary.json"
        return path.exists() and not json.loads(path.read_text()).get("interrupted")

    def busy(self) -> bool:
        """Its run is going on in another process (another protocol.py, a run started by hand): the run
        folder's lock is held. It is waited for, not started twice."""
        import fcntl

        path = self.folder / ".dataflex.lock"
        if not path.exists():
            return False
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
        return False


def tasks(proto: dict, out: Path, seeds: list) -> list:
    """Every run of the protocol in the order they start: the reference, then family by family, seed by
    seed, every strategy. A strategy's overrides are bench/sweeps.py's; {ref}, {out}, {target} filled in here."""
    common = [f"backend={proto['backend']}", f"data={proto['corpus']}", f"model={proto['model']}", "logger=none",
              "trainer.plot=false", f"trainer.max_steps={proto['steps']}", f"trainer.eval_every={proto['eval_every']}",
              f"trainer.checkpoint_every={proto['checkpoint_every']}"]
    ref = out / "reference"
    found = [Task("reference", ref, [*common, "+mixer=static", "mixer.weights=uniform", "trainer.seed=0"], [])]
    for family in proto["families"]:
        for seed in seeds:
            for i, (label, variant) in enumerate(FAMILIES[family].items()):
                if label in (proto.get("exclude") or {}).get(family, ()):
                    continue
                own, deps = [], []
                for e in variant:      # a path to the same seed's run stays `${trainer.seed}`: one strategy
                    e = e.format(ref=ref, out=out, target=proto["target"])
                    e = e.replace("keep_fraction=0.1", f"keep_fraction={proto['budget']}")
                    if str(ref) in e:
                        deps.append("reference")
                    for fam, j in re.findall(rf"{re.escape(str(out))}/(\w+)/v(\d+)/", e):
                        deps.append((fam, int(j), seed))
                    own.append(e)
                found.append(Task((family, i, seed), out / family / f"v{i}" / str(seed),
                                  [*common, *own, f"trainer.seed={seed}"], deps))
    first = {}
    for t in found:            # the same run under two names (the baseline of one family is a strategy of another)
        twin = first.setdefault(tuple(t.args), t)
        if twin is not t:
            t.copy_of, t.deps = twin, [twin.key]
    return found


def command(task: Task) -> list:
    args = list(task.args)
    if task.folder.exists():
        ckpts = task.folder / "checkpoints"
        args.append("trainer.resume=latest" if ckpts.is_dir() and any(ckpts.iterdir()) else "trainer.overwrite=true")
    return [sys.executable, str(ROOT / "launch" / "train.py"), *args, f"hydra.run.dir={task.folder}"]


def run_all(todo: list, jobs: int, logs: Path) -> list:
    """Runs the tasks, `jobs` at a time, each after its dependencies; returns the 1-minute load averages
    sampled every 30 s meanwhile."""
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS=threads)
    by_key = {t.key: t for t in todo}
    waiting = [t for t in todo if not t.done()]
    running, walls, failed, loads, sampled = {}, {}, [], [os.getloadavg()[0]], time.time()
    print(f"protocol: {len(todo) - len(waiting)} of {len(todo)} runs done, {len(waiting)} to run, {jobs} at a time",
          flush=True)
    while waiting or running:
        for t in list(waiting):
            if len(running) >= jobs:
                break
            if any(not by_key[d].done() for d in t.deps):
                if any(d in failed for d in t.deps):
                    waiting.remove(t)
                    failed.append(t.key)
                continue
            if t.busy():
                continue
            waiting.remove(t)
            name = "-".join(map(str, t.key)) if isinstance(t.key, tuple) else t.key
            if t.copy_of is not None:
                shutil.rmtree(t.folder, ignore_errors=True)
                shutil.copytree(t.copy_of.folder, t.folder, ignore=shutil.ignore_patterns("checkpoints", ".dataflex.lock"))
                print(f"[{datetime.now():%H:%M:%S}] {name}: the same run as {t.copy_of.folder.relative_to(ROOT)}, "
                      "copied", flush=True)
                continue
            log = open(logs / f"{name}.log", "w")
            cmd = command(t)
            print(f"[{datetime.now():%H:%M:%S}] start {name}: {' '.join(cmd[2:])}", flush=True)
            running[t.key] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                              time.time(), log, name)
        time.sleep(1)
        if time.time() - sampled >= 30:
            loads.append(os.getloadavg()[0])
            sampled = time.time()
        for key, (proc, start, log, name) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[key]
            walls[name] = round(time.time() - start, 1)
            ok = proc.returncode == 0 and by_key[key].done()
            where = "" if ok else f"; log: {logs / name}.log"
            print(f"[{datetime.now():%H:%M:%S}] {'done' if ok else 'FAILED'} {name} ({walls[name]:.0f} s, "
                  f"rc {proc.returncode}{where})", flush=True)
            if not ok:
                failed.append(key)
        waiting = [t for t in waiting if not t.done()]          # a run made elsewhere meanwhile
        if not waiting and not running:
            break
        if waiting and not running and not any(t.busy() for t in waiting) and all(
                any(not by_key[d].done() for d in t.deps) for t in waiting):
            failed += [t.key for t in waiting]
            break
    if failed:
        print(f"protocol: {len(failed)} runs failed or could not start: {failed}", file=sys.stderr)
    return loads


def pages(proto: dict, out: Path) -> None:
    for family in proto["families"]:
        if not (out / family).is_dir():
            continue
        dest = ROOT / proto["pages"].format(family=family)
        cmd = [sys.executable, str(ROOT / "launch" / "compare.py"), str(out / family), "--out", str(dest),
               "--interval", proto["interval"], "--baseline", BASELINES[family]]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)


# compare.py's --baseline: a unique part of the label its page gives the protocol's baseline strategy
BASELINES = {"mixers": "weights=uniform", "reweighters": "no plugins", "selectors": "selector=random"}


def provenance(proto: dict, seeds: list, out: Path, path: Path, session: dict) -> None:
    """The protocol's record beside its pages: the machine, every run's wall time and end (from the run's own
    summary.json, whichever invocation made it), and each invocation of this script (its commit, start, end
    and the load average sampled while it ran)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    runs = {}
    for summary in sorted(out.glob("*/v*/*/summary.json")) + [out / "reference" / "summary.json"]:
        if summary.exists():
            s = json.loads(summary.read_text())
            runs[str(summary.parent.relative_to(out))] = {
                "wall_time_s": round(s.get("wall_time_s", 0.0), 1), "steps": s.get("steps"),
                "finished": datetime.fromtimestamp(summary.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")}
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "protocol": proto, "seeds": seeds, "machine": f"{cpu}, {os.cpu_count()} cores, no GPU",
        "python": platform.python_version(), "torch": torch.__version__,
        "invocations": old.get("invocations", []) + [session], "runs": runs}, indent=1) + "\n")


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", type=Path, default=ROOT / "bench" / "protocol.yaml")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one per core here)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the protocol's")
    p.add_argument("--pages-only", action="store_true")
    a = p.parse_args(argv)
    proto = yaml.safe_load(a.protocol.read_text())
    seeds = a.seeds or proto["seeds"]
    out = ROOT / proto["out"]
    session = {"commit": git_commit(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "pages_only": a.pages_only, "jobs": a.jobs}
    loads = [] if a.pages_only else run_all(tasks(proto, out, seeds), a.jobs, out / "logs")
    pages(proto, out)
    session.update(ended=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   load_1min={"min": min(loads), "mean": round(sum(loads) / len(loads), 2), "max": max(loads),
                              "samples": len(loads)} if loads else None)
    provenance(proto, seeds, out, ROOT / proto["provenance"], session)


if __name__ == "__main__":
    main()
