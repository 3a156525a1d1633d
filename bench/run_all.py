"""Run every benchmark and print one table of ratios, each against its baseline measured in the same run.

    .venv/bin/python bench/run_all.py                  # what `make bench` runs: every bench, quick sizes (~10 min)
    .venv/bin/python bench/run_all.py --full           # the benches' own default sizes, + LESS on SmolLM2 (hours)
    .venv/bin/python bench/run_all.py --only step scoring
    .venv/bin/python bench/run_all.py --skip dataprep --no-deepspeed

Each bench_*.py runs in its own process (so one's threads, imports and memory never touch the next)
with its output in bench/results/logs/NAME.log; its results JSON (bench/results/*.json) is read back
and one markdown table is printed and written to bench/results/summary.md: benchmark | what |
baseline | ratio | absolute figures. The device is CUDA when torch sees one (bench_scoring then
runs its model there; the other benches time the CPU paths they were written for), else the CPU;
the header says which. Nothing here asserts on time; a failing bench is reported and the rest run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt_ratio  # noqa: E402

HERE = Path(__file__).resolve().parent

# name -> (script, quick arguments, full arguments, results file (a glob: the newest match))
BENCHES = {
    "step": ("bench_step.py", ["--steps", "10", "--warmup", "2", "--deepspeed"], ["--deepspeed"], "step.json"),
    "grads": ("bench_grads.py", ["--rounds", "3", "--seqs", "128", "--proj-dims", "1024"], [], "grads.json"),
    "scoring": ("bench_scoring.py", ["--quick"], [], "scoring.json"),
    "mixers": ("bench_mixers.py", ["--steps", "10", "--warmup", "1"], [], "mixers.json"),
    "reweighters": ("bench_reweighters.py", ["--steps", "10", "--warmup", "2"], [], "reweighters.json"),
    "megatron": ("bench_megatron.py", ["--steps", "10", "--warmup", "2"], [], "megatron.json"),
    "data": ("bench_data.py", ["--sizes-mb", "10", "100", "--raw-mb", "1"], [], "data.json"),
    "dataprep": ("bench_dataprep.py", ["--docs", "1500", "--mem-docs", "500", "--repeats", "1", "--mem-scales", "1"],
                 [], "bench_dataprep_*.json"),
    "less_smollm2": ("bench_less_smollm2.py", None, ["--n", "2000"], "less_smollm2.json"),   # --full only
    "hf_trainer": ("bench_hf_trainer.py", ["--rounds", "3", "--steps", "8"], [], "hf_trainer.json"),
}


def ms(x) -> str:
    return common.fmt_ms(x) + " ms" if x is not None else "—"


def _variants(res: dict, base: str, unit: str = "ms/step") -> list:
    b = res["variants"][base]
    return [[name, base, fmt_ratio(v["ratio"]), f"{common.fmt_ms(v['ms_per_step'])} vs {common.fmt_ms(b['ms_per_step'])} "
             f"{unit} (fastest {fmt_ratio(v['fastest_ratio'])})"] for name, v in res["variants"].items() if name != base]


def rows_step(res):
    rows = _variants(res["torch"], res["torch"]["baseline"])
    ds = res.get("deepspeed") or {}
    if "variants" in ds:
        rows += [[f"DeepSpeed: {r[0]}"] + r[1:] for r in _variants(ds, ds["baseline"])]
    elif ds.get("error"):
        rows.append(["DeepSpeed", "—", "—", f"failed: {ds['error'][:80]}"])
    return rows


def rows_grads(res):
    out = []
    for s in res["seqs"]:
        base = res["baseline"]
        b = s["methods"][base]
        for name, v in s["methods"].items():
            if name != base and v.get("ratio") is not None:
                out.append([f"{name} (seq {s['seq_len']})", base, fmt_ratio(v["ratio"]),
                            f"{common.fmt_ms(v['ms'])} vs {common.fmt_ms(b['ms'])} ms/call of {s['batch']} "
                            f"(fastest {fmt_ratio(v.get('ratio_min'))})"])
    return out


def rows_scoring(res):
    base = res["variants"][res["baseline"]]
    out = []
    for name, v in res["variants"].items():
        if name == res["baseline"]:
            continue
        extra = f"; {fmt_ratio(v['speedup_vs_loop'])} the per-sample loop's" if v.get("speedup_vs_loop") else ""
        out.append([name, "samples/s of a training step, all parameters", fmt_ratio(v["ratio_vs_training"]),
                    f"{v['samples_per_s']:,.1f} vs {base['samples_per_s']:,.1f} samples/s{extra}"])
    return out


def rows_plugins(res, what):
    base = res["rows"][0]
    out = []
    for r in res["rows"][1:]:
        share = r.get("share", r.get("plugin_share"))
        plugin = r.get("mixer_ms", r.get("plugin_ms"))
        out.append([r["variant"], base["variant"], fmt_ratio(r["step_ms"] / base["step_ms"]),
                    f"{common.fmt_ms(r['step_ms'])} vs {common.fmt_ms(base['step_ms'])} ms/step; {what} "
                    f"{'—' if plugin is None else f'{plugin:.3f}'} ms/step"
                    + ("" if share is None else f" ({100 * share:.2f}% of the step)")])
    return out


def rows_megatron(res):
    return _variants(res, res["baseline"])


def rows_data(res):
    cached = {l["corpus"]: l for l in res["launches"] if l["launch"] == "cached"}
    first = {l["corpus"]: l for l in res["launches"] if l["launch"] == "first"}
    shards = [k for k in cached if "shards" in k]
    out = []
    if len(shards) >= 2:
        small, big = shards[0], shards[-1]
        for key, label in (("load_s", "load_domains"), ("cpu_s", "launch CPU"), ("peak_rss_mb", "peak RSS")):
            a, b = cached[small][key], cached[big][key]
            unit = "MB" if key == "peak_rss_mb" else "s"
            out.append([f"start-up: {label}, {big} (cached)", small, fmt_ratio(b / a if a else float("nan")),
                        f"{b:,.2f} vs {a:,.2f} {unit}"])
    for k, l in first.items():
        if "raw" in k and k in cached:
            out.append([f"start-up: {k}, first launch (tokenizes)", "the cached launch",
                        fmt_ratio(l["cpu_s"] / cached[k]["cpu_s"]), f"{l['cpu_s']:.1f} vs {cached[k]['cpu_s']:.1f} CPU s"])
    s = res.get("sampler") or []
    if len(s) >= 2:
        out.append([f"sampler: draws/s, domain of {s[-1]['samples']:.0e}", f"domain of {s[0]['samples']:.0e}",
                    fmt_ratio(s[-1]["draws_per_s"] / s[0]["draws_per_s"]),
                    f"{s[-1]['draws_per_s']:,.0f} vs {s[0]['draws_per_s']:,.0f} ids/s; state {s[-1]['state_bytes']:,} B"])
    return out


def rows_dataprep(res):
    if "speedup_cpu" not in res:
        return [["dataprep", "datatrove", "—", "datatrove skipped"]]
    best = min(r["cpu_s"] for r in res["dataprep_runs"])
    theirs = min(r["cpu_s"] for r in res["datatrove_runs"])
    return [[f"dataprep docs/s/core (CPU), {res['docs']} docs, {res['workers']} workers",
             "datatrove, the same documents and workers", fmt_ratio(res["speedup_cpu"]),
             f"{best:.1f} vs {theirs:.1f} CPU s (wall ratio {fmt_ratio(res['speedup_wall'])})"]]


def rows_less_smollm2(res):
    total = res["less_total_s"]
    return [[f"LESS on SmolLM2-135M, N={res['n']:,}: per-sample loop (extrapolated)", "dataflex's batched LESS",
             fmt_ratio(res["loop_vs_batched"]), f"pool {res['pool_samples_per_s']:.2f} samples/s per checkpoint; "
             f"warm-up to selection {total:,.0f} s"]]


def rows_hf_trainer(res):
    base = res["variants"][res["baseline"]]
    labels = {"dataflex": "DataFlexTrainer, no plugin (lean loss)", "dataflex-logits": "DataFlexTrainer, no plugin, "
              "lean_loss=False"}
    return [[labels.get(name, name), "plain transformers.Trainer", fmt_ratio(v["ratio_median"]),
             f"{common.fmt_ms(v['ms_per_step_median'])} vs {common.fmt_ms(base['ms_per_step_median'])} ms/step "
             f"(mean ratio {fmt_ratio(v['ratio_mean'])})"]
            for name, v in res["variants"].items() if name != res["baseline"]]


ROWS = {"step": rows_step, "grads": rows_grads, "scoring": rows_scoring, "hf_trainer": rows_hf_trainer,
        "mixers": lambda r: rows_plugins(r, "mixer"),
        "reweighters": lambda r: rows_plugins(r, "plugin"),
        "megatron": rows_megatron, "data": rows_data, "dataprep": rows_dataprep, "less_smollm2": rows_less_smollm2}


def run_one(name: str, full: bool, drop=()) -> dict:
    script, quick_args, full_args, pattern = BENCHES[name]
    args = [a for a in (full_args if full else quick_args) if a not in drop]
    logs = common.RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    cmd = [sys.executable, str(HERE / script)] + args
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join([Path(cmd[1]).relative_to(common.ROOT).as_posix()] + args)}",
          flush=True)
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=common.ROOT)
    wall = time.time() - t
    files = [p for p in glob.glob(str(common.RESULTS / pattern)) if os.path.getmtime(p) >= t - 1]
    out = {"name": name, "command": " ".join([".venv/bin/python", f"bench/{script}"] + args), "wall_s": wall,
           "rc": proc.returncode, "log": str(log.relative_to(common.ROOT))}
    if proc.returncode != 0 or not files:
        out["error"] = f"exit {proc.returncode}" + ("" if files else ", no results file")
        print(f"    FAILED ({out['error']}; {out['log']})", flush=True)
        return out
    out["json"] = max(files, key=os.path.getmtime)
    try:
        out["rows"] = ROWS[name](json.loads(Path(out["json"]).read_text()))
    except (KeyError, TypeError, ZeroDivisionError, ValueError) as e:
        out["error"] = f"results not understood: {e!r}"
    print(f"    {wall:.0f} s" + (f"; {out['error']}" if "error" in out else ""), flush=True)
    return out


def summary(results: list, device: str, env: dict, loads: dict, full: bool) -> str:
    rows = []
    for r in results:
        if "rows" in r:
            rows += [[f"{r['name']}"] + row for row in r["rows"]]
        else:
            rows.append([r["name"], "—", "—", "—", f"FAILED: {r.get('error')} ({r['log']})"])
    cpus = os.cpu_count() or 1
    busy = max(v[0] for v in loads.values()) > cpus + 0.5
    head = (f"## Benchmarks: every ratio against its baseline in the same run\n\n"
            f"Device: **{device}** ({env['cpu']}, {env['cpus']} CPUs, torch {env['torch']}, python {env['python']}, "
            f"commit {env['commit'] or '?'}, {env['time']}); {'full' if full else 'quick'} sizes; load average "
            + ", ".join(f"{v[0]:.1f} {k}" for k, v in loads.items())
            + (" (other processes competed for the CPUs: medians include waiting; see the fastest ratios)"
               if busy else "") + ".\n\n")
    table = common.markdown_table(["benchmark", "what", "baseline", "ratio", "absolute figures"], rows)
    cmds = "\n".join(f"- `{r['name']}` ({r['wall_s']:.0f} s): `{r['command']}`" for r in results)
    return head + table + "\n\nCommands (logs in bench/results/logs/):\n\n" + cmds + "\n"


def _load_of(res: dict):
    for key in ("loadavg", "loadavg_at_save", "load_avg_end", "load_end"):
        v = res.get(key)
        if isinstance(v, dict):
            v = v.get("end") or next(iter(v.values()), None)
        if isinstance(v, (list, tuple)) and v:
            return float(v[0])
    return None


def summarize(names: list) -> int:
    """Rebuild bench/results/summary.md and summary.json from the results files already there (no bench runs):
    one table, each bench's rows with the date, commit, machine and load its own JSON recorded."""
    benches, rows, notes = [], [], []
    for name in names:
        pattern = BENCHES[name][3]
        files = sorted(glob.glob(str(common.RESULTS / pattern)), key=os.path.getmtime)
        if not files:
            continue
        path = Path(files[-1])
        res = json.loads(path.read_text())
        env = res.get("env") or res.get("environment") or {}
        load = _load_of(res) if _load_of(res) is not None else _load_of(res.get("machine") or {})
        bench_rows = ROWS[name](res)
        rows += [[name] + r for r in bench_rows]
        rel = path.relative_to(common.ROOT).as_posix()
        benches.append({"name": name, "json": rel, "command": res.get("command"), "env": env, "load_at_end": load,
                        "rows": bench_rows})
        script, quick = BENCHES[name][0], BENCHES[name][1] or []
        command = " ".join(Path(w).name if w.endswith("python") else w.replace(str(common.ROOT) + "/", "")
                           for w in str(res.get("command") or " ".join(["python", f"bench/{script}"] + quick)).split())
        notes.append(f"- `{name}`: `{rel}`, {env.get('time', '?')}, commit {env.get('commit', '?')}, "
                     f"{env.get('cpu', '?')} ({env.get('cpus', '?')} CPUs), load average at its end "
                     f"{'?' if load is None else f'{load:.1f}'}: `{command}`")
    text = ("| benchmark | what | baseline | ratio | absolute figures |\n|---|---|---|---|---|\n"
            + "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows)
            + "\n\nEach bench's run (its results file, when, on what, and the command):\n\n" + "\n".join(notes) + "\n")
    (common.RESULTS / "summary.md").write_text(text)
    common.save_json("summary.json", {"command": common.command_line(), "benches": benches})
    print(text)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="each bench's own default sizes, and LESS on SmolLM2")
    p.add_argument("--quick", action="store_true", help="the default: quick sizes (kept for old command lines)")
    p.add_argument("--only", nargs="+", choices=list(BENCHES), help="run just these")
    p.add_argument("--skip", nargs="+", default=[], choices=list(BENCHES))
    p.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeed out of the step bench")
    p.add_argument("--no-data", action="store_true", help="same as --skip data")
    p.add_argument("--summarize", action="store_true",
                   help="run nothing: rebuild summary.md and summary.json from the results files already saved")
    args = p.parse_args(argv)
    if args.summarize:
        return summarize([n for n in (args.only or [n for n in BENCHES if BENCHES[n][1] is not None])
                          if n not in args.skip])
    names = args.only or [n for n in BENCHES if args.full or BENCHES[n][1] is not None]
    names = [n for n in names if n not in args.skip and not (args.no_data and n == "data")]
    torch = common.setup_torch()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = common.environment()
    print(f"$ {common.command_line()}\n{device}; {env['cpu']}, {env['cpus']} CPUs, torch {env['torch']}", flush=True)
    started, loads, results = time.time(), {"at start": os.getloadavg()}, []
    for name in names:
        results.append(run_one(name, args.full, drop=["--deepspeed"] if args.no_deepspeed else []))
    loads["at end"] = os.getloadavg()
    text = summary(results, device, env, loads, args.full)
    text += f"\nTotal {time.time() - started:.0f} s.\n"
    print("\n" + text)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / "summary.md").write_text(text)
    common.save_json("run_all.json", {"command": common.command_line(), "device": device, "env": env, "loadavg": loads,
                                      "benches": results, "total_s": time.time() - started})
    print("saved bench/results/summary.md, bench/results/run_all.json")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
