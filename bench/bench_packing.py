"""Packed vs padded rows: useful-token fraction and what packing costs per step, on one corpus with its tokenizer.

    OMP_NUM_THREADS=2 python bench/bench_packing.py               # the embedded corpus; seq_len 512, 2048, 4096; ~1 min
    OMP_NUM_THREADS=2 python bench/bench_packing.py --data bench  # the benchmark corpus (data=bench: 7 domains, many
                                                                  # short documents), built first if missing; ~3 min

`--data embedded` (configs/data/default.yaml) or `--data bench` (configs/data/bench.yaml, its own 8k BPE).

useful-token fraction = label tokens / token slots:
  padded: every sample of the training set in a row of its own (what trainer.packing=false trains on);
  packed: the rows DataFlex's planner (best-fit decreasing, dataflex.core.packing.plan_rows) fills over `--steps`
          steps of `--rows` rows, drawn as a run draws (size-proportional domain weights, seed 0), samples
          waiting for a row counted when they train (`max_wait_steps`: the longest wait of a trained sample);
  offline bound: no packing of the whole training set, every sample in one row of its own or shared, can do
          better than sum(lengths) / (seq_len * L2), L2 the Martello-Toth lower bound on the number of rows
          (`offline_bound_fraction`); `offline_ffd_fraction`: first-fit decreasing of the whole set at once.
Packing's cost per step: placing the samples into rows (`plan_rows`, `plan_ms_median`, the time inside its
draws taken out) and building the packed batch (`packed_batch`, `build_ms_median`), medians over the steps;
the sampler's draws are timed apart (`draw_ms_median`: a padded run draws too, a sample at a time instead of
~2-3x as many to fill the rows). The build is also timed again on one thread (small index work gains
nothing from threads and, on a loaded machine, loses much to them); at seq_len 512 also one TinyGPT
forward+backward on a packed batch for scale.
Training throughput (`throughput`): label tokens trained per second, packed vs padded, TinyGPT (the benchmarks'
shape) at seq_len `--tput-seq-len` (1024) with `--tput-rows` rows a step, in one process: two DataFlex sessions
(trainer.packing=true and false, seed 0, size-proportional draws) with a model and AdamW each, stepped in
alternating blocks of `--tput-steps` steps for `--tput-rounds` rounds after one warm-up step each; a step is
next_batch, forward (lean loss), backward, optimizer step and end_step. Reported: each layout's label tokens per
second and the ratio packed / padded from the same run (load shifts both alike), and each step's time, with the
ratio again from median step times (`ratio_packed_vs_padded_median_steps`: mean label tokens per step over the median
step time), which a stall of the machine during one layout's block does not carry.
Results: bench/results/packing.json (`--data embedded`) or packing_bench.json (`--data bench`; with the corpus's
input versions and any sources its build skipped), each with date, commit, machine, load at start and end.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

from common import (BENCH_DATA_CONFIG, DATA_CONFIG, MODEL, ROOT, environment, load_domains,  # noqa: E402
                    markdown_table, save_json, setup_torch)

CORPORA = {"embedded": (DATA_CONFIG, "packing.json"), "bench": (BENCH_DATA_CONFIG, "packing_bench.json")}


def throughput(T: int, rows: int, steps: int, rounds: int, config=DATA_CONFIG) -> dict:
    """Label tokens per second packed vs padded, interleaved in one process (see the module docstring)."""
    torch = setup_torch()
    from dataflex.models.tiny_gpt import TinyGPT
    from dataflex.session.flex import DataFlex

    domains = load_domains(T, config)
    runs = {}
    for layout in ("padded", "packed"):
        model = TinyGPT(vocab_size=domains.tokenizer.vocab_size, seq_len=T, seed=0, **MODEL)
        runs[layout] = {"flex": DataFlex(domains.train, rows, seed=0, packing=layout == "packed"), "model": model,
                        "opt": torch.optim.AdamW(model.parameters(), lr=1e-3), "tokens": 0, "seconds": 0.0,
                        "steps": 0, "step_s": []}

    def step(run):
        flex, model, opt = run["flex"], run["model"], run["opt"]
        t0 = time.perf_counter()
        batch = flex.next_batch()
        loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"], lean=True), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = flex.end_step()
        return time.perf_counter() - t0, record["tokens"]

    for run in runs.values():       # warm-up: allocator, first data reads
        step(run)
    for _ in range(rounds):
        for run in runs.values():
            for _ in range(steps):
                seconds, tokens = step(run)
                run["seconds"] += seconds
                run["tokens"] += tokens
                run["steps"] += 1
                run["step_s"].append(seconds)
    out = {"seq_len": T, "rows": rows, "steps_per_block": steps, "rounds": rounds, "model": dict(MODEL)}
    for layout, run in runs.items():
        out[layout] = {"label_tokens_per_s": round(run["tokens"] / run["seconds"], 1),
                       "step_ms_mean": round(1000 * run["seconds"] / run["steps"], 1),
                       "step_ms_median": round(1000 * statistics.median(run["step_s"]), 1),
                       "label_tokens_per_step": round(run["tokens"] / run["steps"], 1), "steps": run["steps"],
                       "step_ms": [round(1000 * t, 1) for t in run["step_s"]]}
    out["ratio_packed_vs_padded"] = round(out["packed"]["label_tokens_per_s"] / out["padded"]["label_tokens_per_s"], 2)
    # the same ratio from median step times (mean label tokens per step / median step time): a stall of the machine
    # (memory pressure, another process's burst) during one layout's block moves the mean but hardly the median
    out["ratio_packed_vs_padded_median_steps"] = round(
        (out["packed"]["label_tokens_per_step"] / out["packed"]["step_ms_median"])
        / (out["padded"]["label_tokens_per_step"] / out["padded"]["step_ms_median"]), 2)
    print(f"throughput at seq_len {T}: padded {out['padded']['label_tokens_per_s']} label tok/s, packed "
          f"{out['packed']['label_tokens_per_s']} label tok/s: {out['ratio_packed_vs_padded']}x (from median steps "
          f"{out['ratio_packed_vs_padded_median_steps']}x)", file=sys.stderr)
    return out


def rows_lower_bound(lengths, T: int) -> int:
    """Martello & Toth's L2 lower bound on the bins of a bin-packing instance (capacity T): for every K <= T/2,
    items over T - K need a bin each, items in (T/2, T - K] too, and items in [K, T/2] fill what those leave."""
    import numpy as np

    L = np.asarray(lengths, dtype=np.int64)
    best = int(np.ceil(L.sum() / T))
    for K in np.unique(np.concatenate([[0], L[L <= T // 2]])).tolist():
        j1, j2 = L[L > T - K], L[(L > T / 2) & (L <= T - K)]
        j3 = L[(L >= K) & (L <= T / 2)]
        best = max(best, len(j1) + len(j2) + max(0, int(np.ceil((j3.sum() - (len(j2) * T - j2.sum())) / T))))
    return best


def first_fit_decreasing_rows(lengths, T: int) -> int:
    import numpy as np

    free = np.zeros(0, dtype=np.int64)
    for n in np.sort(np.asarray(lengths, dtype=np.int64))[::-1].tolist():
        fits = np.flatnonzero(free >= n)
        if len(fits):
            free[fits[0]] -= n
        else:
            free = np.append(free, T - n)
    return len(free)


def corpus_info(data: str) -> dict:
    """What the corpus was built from: the benchmark corpus's input versions and skipped sources (its corpus.json),
    the domains' names and training samples at each measured seq_len are in `results`."""
    if data != "bench":
        return {"name": data}
    import json

    from omegaconf import OmegaConf

    root = OmegaConf.to_container(OmegaConf.load(BENCH_DATA_CONFIG), resolve=True)["build"]["root"]
    try:
        with open(os.path.join(root, "corpus.json")) as f:
            built = json.load(f)
    except OSError:
        return {"name": data, "root": root}
    return {"name": data, "recipe": built.get("recipe"), "vocab_size": built.get("vocab_size"),
            "inputs": {k: v.get("version") for k, v in built.get("inputs", {}).items()},
            "skipped": built.get("skipped", [])}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=sorted(CORPORA), default="embedded",
                    help="embedded: configs/data/default.yaml; bench: the benchmark corpus (configs/data/bench.yaml)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tput-seq-len", type=int, default=1024)
    ap.add_argument("--tput-rows", type=int, default=4)
    ap.add_argument("--tput-steps", type=int, default=3)
    ap.add_argument("--tput-rounds", type=int, default=4)
    args = ap.parse_args(argv)
    config, results_name = CORPORA[args.data]
    load_start = os.getloadavg()
    torch = setup_torch()
    from dataflex.core.packing import plan_rows
    from dataflex.core.sampler import DataAwareSampler
    from dataflex.data.mixture import MixtureDataset

    results = []
    for T in args.seq_lens:
        domains = load_domains(T, config)
        data = MixtureDataset(domains.train)
        lengths = data.lengths(torch.arange(len(data)))
        padded = float(lengths.sum()) / (len(data) * T)
        sampler = DataAwareSampler(data.sizes, seed=0, weights=torch.tensor(data.sizes, dtype=torch.float64))
        plan_s, draw_s, build_s, build1_s, used, counts, born, waits = [], [], [], [], 0, [], {}, []

        def draw(n, step, sampler=sampler, born=born, spent=None):
            t = time.perf_counter()
            ids = sampler.draw(n)
            for i in ids.tolist():
                born.setdefault(i, []).append(step)
            spent[0] += time.perf_counter() - t         # the sampler's draws (and this bookkeeping): not packing
            return ids
        for step in range(args.steps):
            spent = [0.0]
            t0 = time.perf_counter()
            plan = plan_rows(sampler.pending, functools.partial(draw, step=step, spent=spent), data.lengths,
                             args.rows, T)
            sampler.pending = plan.carry
            t1 = time.perf_counter() - spent[0]
            draw_s.append(spent[0])
            t1b = time.perf_counter()
            batch = data.packed_batch(plan.ids, plan.rows, plan.offsets, args.rows)
            t2 = time.perf_counter()
            threads = torch.get_num_threads()
            torch.set_num_threads(1)            # the same build on one thread (a loader worker's setting)
            data.packed_batch(plan.ids, plan.rows, plan.offsets, args.rows)
            build1_s.append(time.perf_counter() - t2)
            torch.set_num_threads(threads)
            plan_s.append(t1 - t0), build_s.append(t2 - t1b)
            used += plan.slots_used()
            counts.append(len(plan.ids))
            waits += [step - born[i].pop(0) for i in plan.ids.tolist()]
        packed = used / (args.steps * args.rows * T)
        row = {"seq_len": T, "samples": len(data), "mean_sample_tokens": round(float(lengths.mean()), 1),
               "domain_samples": dict(zip(domains.train, map(int, data.sizes))),
               "padded_fraction": round(padded, 4), "packed_fraction": round(packed, 4),
               "samples_per_step_packed": round(sum(counts) / len(counts), 1),
               "plan_ms_median": round(1000 * sorted(plan_s)[len(plan_s) // 2], 3),
               "draw_ms_median": round(1000 * sorted(draw_s)[len(draw_s) // 2], 3),
               "build_ms_median": round(1000 * sorted(build_s)[len(build_s) // 2], 3),
               "build_ms_median_one_thread": round(1000 * sorted(build1_s)[len(build1_s) // 2], 3),
               "waiting_at_end": len(sampler.pending), "max_wait_steps": max(waits),
               "offline_bound_fraction": round(float(lengths.sum()) / (T * rows_lower_bound(lengths, T)), 4),
               "offline_ffd_fraction": round(float(lengths.sum()) / (T * first_fit_decreasing_rows(lengths, T)), 4)}
        if T == 512:            # scale: one TinyGPT step on this packed batch
            from dataflex.core.loss import LossWrapper
            from dataflex.models.tiny_gpt import TinyGPT

            model = TinyGPT(vocab_size=domains.tokenizer.vocab_size, seq_len=T, **MODEL)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                loss = LossWrapper()(model(batch["input_ids"], position_ids=batch["position_ids"], lean=True), batch)
                loss.backward()
                times.append(time.perf_counter() - t0)
            step_ms = 1000 * sorted(times)[1]
            row["tinygpt_step_ms"] = round(step_ms, 1)
            row["packing_share_of_step"] = round((row["plan_ms_median"] + row["build_ms_median"]) / step_ms, 4)
            row["packing_share_of_step_one_thread_build"] = round(
                (row["plan_ms_median"] + row["build_ms_median_one_thread"]) / step_ms, 4)
        results.append(row)
        print(f"seq_len {T}: padded {padded:.3f}, packed {packed:.3f} (offline bound "
              f"{row['offline_bound_fraction']}), plan {row['plan_ms_median']} ms, build {row['build_ms_median']} ms",
              file=sys.stderr)
    tput = throughput(args.tput_seq_len, args.tput_rows, args.tput_steps, args.tput_rounds, config)
    payload = {"bench": "packing", "command": "OMP_NUM_THREADS=2 python bench/bench_packing.py " + " ".join(argv or sys.argv[1:]),
               "data": args.data, "data_config": str(config.relative_to(ROOT)), "corpus": corpus_info(args.data),
               "rows": args.rows, "steps": args.steps, "results": results, "throughput": tput,
               "environment": environment(),
               "machine": environment()["cpu"], "load_start": load_start, "load_end": os.getloadavg()}
    path = save_json(results_name, payload)
    print(markdown_table(["seq_len", "padded", "packed", "offline bound", "offline FFD", "plan ms", "build ms",
                          "build ms (1 thread)"],
                         [[r["seq_len"], r["padded_fraction"], r["packed_fraction"], r["offline_bound_fraction"],
                           r["offline_ffd_fraction"], r["plan_ms_median"], r["build_ms_median"],
                           r["build_ms_median_one_thread"]] for r in results]))
    print(markdown_table(["seq_len", "layout", "label tokens/s", "step ms", "step ms (median)", "label tokens/step"],
                         [[tput["seq_len"], k, tput[k]["label_tokens_per_s"], tput[k]["step_ms_mean"],
                           tput[k]["step_ms_median"], tput[k]["label_tokens_per_step"]] for k in ("padded", "packed")]))
    print(f"throughput ratio packed / padded: {tput['ratio_packed_vs_padded']}x "
          f"(from median step times: {tput['ratio_packed_vs_padded_median_steps']}x)")
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
