"""Packed vs padded rows on the embedded corpus: useful-token fraction and what packing costs per step.

    OMP_NUM_THREADS=2 python bench/bench_packing.py            # seq_len 512, 2048, 4096; about a minute

useful-token fraction = label tokens / token slots:
  padded: every sample of the training set in a row of its own (what trainer.packing=false trains on);
  packed: the rows DataFlex's first-fit plans over `--steps` steps of `--rows` rows, drawn as a run draws
          (size-proportional domain weights, seed 0), samples waiting for a row counted when they train.
Planning cost per step: drawing and first-fit (`plan_rows`), and building the packed batch (`packed_batch`),
medians over the steps; at seq_len 512 also one TinyGPT forward+backward on a packed batch for scale.
Results: bench/results/packing.json (date, commit, machine, load at start and end).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import MODEL, ROOT, environment, load_domains, markdown_table, save_json, setup_torch  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    torch = setup_torch()
    from dataflex.core.packing import plan_rows
    from dataflex.core.sampler import DataAwareSampler
    from dataflex.data.mixture import MixtureDataset

    results = []
    for T in args.seq_lens:
        data = MixtureDataset(load_domains(T).train)
        lengths = data.lengths(torch.arange(len(data)))
        padded = float(lengths.sum()) / (len(data) * T)
        sampler = DataAwareSampler(data.sizes, seed=0, weights=torch.tensor(data.sizes, dtype=torch.float64))
        plan_s, build_s, used, counts = [], [], 0, []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            plan = plan_rows(sampler.pending, sampler.draw, data.lengths, args.rows, T)
            sampler.pending = plan.carry
            t1 = time.perf_counter()
            batch = data.packed_batch(plan.ids, plan.rows, plan.offsets, args.rows)
            t2 = time.perf_counter()
            plan_s.append(t1 - t0), build_s.append(t2 - t1)
            used += plan.slots_used()
            counts.append(len(plan.ids))
        packed = used / (args.steps * args.rows * T)
        row = {"seq_len": T, "samples": len(data), "mean_sample_tokens": float(lengths.mean()),
               "padded_fraction": round(padded, 4), "packed_fraction": round(packed, 4),
               "samples_per_step_packed": round(sum(counts) / len(counts), 1),
               "plan_ms_median": round(1000 * sorted(plan_s)[len(plan_s) // 2], 3),
               "build_ms_median": round(1000 * sorted(build_s)[len(build_s) // 2], 3),
               "waiting_at_end": len(sampler.pending)}
        if T == 512:            # scale: one TinyGPT step on this packed batch
            from dataflex.core.loss import LossWrapper
            from dataflex.models.tiny_gpt import TinyGPT

            model = TinyGPT(vocab_size=load_domains(T).tokenizer.vocab_size, seq_len=T, **MODEL)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                loss = LossWrapper()(model(batch["input_ids"], position_ids=batch["position_ids"], lean=True), batch)
                loss.backward()
                times.append(time.perf_counter() - t0)
            step_ms = 1000 * sorted(times)[1]
            row["tinygpt_step_ms"] = round(step_ms, 1)
            row["packing_share_of_step"] = round((row["plan_ms_median"] + row["build_ms_median"]) / step_ms, 4)
        results.append(row)
        print(f"seq_len {T}: padded {padded:.3f}, packed {packed:.3f}, plan {row['plan_ms_median']} ms, "
              f"build {row['build_ms_median']} ms", file=sys.stderr)
    payload = {"bench": "packing", "command": "OMP_NUM_THREADS=2 python bench/bench_packing.py " + " ".join(argv or sys.argv[1:]),
               "rows": args.rows, "steps": args.steps, "results": results, "environment": environment(),
               "machine": environment()["cpu"], "load_start": load_start, "load_end": os.getloadavg()}
    path = save_json("packing.json", payload)
    print(markdown_table(["seq_len", "padded", "packed", "plan ms", "build ms"],
                         [[r["seq_len"], r["padded_fraction"], r["packed_fraction"], r["plan_ms_median"],
                           r["build_ms_median"]] for r in results]))
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
