"""The lean loss (dataflex.core.lean_loss) against the logits path: peak memory and time, V = 32k / 128k.

A random-init HF Llama (2 layers, hidden 256, untied lm_head), batch 1, seq_len 1024 and 2048, in
one run:

- memory: a fresh subprocess per (V, seq_len, path, weighting) builds the model, then does one
  training step (forward, `flex.loss`-style weighted loss through `LossWrapper`, backward). CPU:
  the peak RSS of the step above the RSS just before it (`/proc/self/clear_refs` resets the peak;
  `bench.common.measure_peak`), and the process's whole peak RSS (`ru_maxrss`). CUDA:
  `max_memory_allocated` above `memory_allocated` before the step.
- time: one subprocess per (V, seq_len, path) times the loss alone (head + per-token loss +
  weighting + backward into the hidden states and the head) from fixed hidden states, weighted and
  unweighted alternating, median of `--repeats`.

Ratios are against the logits path measured in the same run. Targets (issue 22): lean peak memory
<= 20% of the logits path's at V = 128k; weighted lean within 5% of unweighted lean time; lean no
slower than logits.

    python bench/bench_lean_loss.py                      # -> bench/results/lean_loss.json
    python bench/bench_lean_loss.py --vocab 32000 --seq 1024 --repeats 2    # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, THREADS, environment, markdown_table, measure_peak, save_json  # noqa: E402

HIDDEN, LAYERS = 256, 2


def build(vocab: int, seq: int, seed: int = 0):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                   num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=seq, tie_word_embeddings=False, bos_token_id=None,
                                   eos_token_id=None, pad_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (1, seq + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(1, seq),
             "position_ids": torch.arange(seq).unsqueeze(0)}
    return model, batch


def wrapper(batch, weighted: bool):
    import torch

    from dataflex.loss import LossWrapper
    if not weighted:
        return LossWrapper()
    g = torch.Generator().manual_seed(7)
    answer = {"sample_weights": torch.rand(1, generator=g) + 0.5,
              "token_weights": torch.rand(batch["labels"].shape, generator=g) * 2,
              "denominator": torch.tensor(float(batch["labels"].numel()))}
    return LossWrapper(weigh=lambda signal, b: {k: v.to(signal["loss"].device) for k, v in answer.items()})


def to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def child_memory(vocab: int, seq: int, path: str, weighted: bool) -> dict:
    import torch

    from dataflex.hf import forward_for
    from dataflex.models.lean import lean_forward
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, batch = build(vocab, seq)
    model.to(device)
    batch = to(batch, device)
    forward = forward_for(model)
    loss_fn = wrapper(batch, weighted)

    def step():
        out = lean_forward(forward, model, batch) if path == "lean" else forward(model, batch)
        loss = loss_fn(out, batch)
        loss.backward()
        return float(loss)

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        loss, seconds, peak = measure_peak(step)
    return {"loss": loss, "step_s": seconds, "step_peak_mib": peak,
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "device": device.type}


def child_time(vocab: int, seq: int, path: str, repeats: int) -> dict:
    """The loss alone: fixed hidden states (a leaf), head, per-token loss, weighting, backward."""
    import torch

    from dataflex.core.lean_loss import LeanOutput
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, batch = build(vocab, seq)
    model.to(device)
    batch = to(batch, device)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    hidden = hidden.detach().requires_grad_(True)
    head = model.lm_head
    fns = {w: wrapper(batch, w) for w in (False, True)}
    times = {False: [], True: []}
    losses = {}
    for r in range(repeats + 1):                    # the first round warms up
        for weighted in ((False, True) if r % 2 == 0 else (True, False)):
            hidden.grad = None
            head.weight.grad = None
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = LeanOutput(hidden, head) if path == "lean" else head(hidden)
            loss = fns[weighted](out, batch)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if r:
                times[weighted].append(time.perf_counter() - t)
            losses[weighted] = float(loss)
    return {"unweighted_s": statistics.median(times[False]), "weighted_s": statistics.median(times[True]),
            "unweighted_runs_s": times[False], "weighted_runs_s": times[True],
            "loss_unweighted": losses[False], "loss_weighted": losses[True]}


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="lean_loss.json")
    ap.add_argument("--child", nargs="+")
    a = ap.parse_args()
    if a.child:
        import torch
        torch.set_num_threads(THREADS)
        kind, vocab, seq, path, extra = a.child[0], int(a.child[1]), int(a.child[2]), a.child[3], a.child[4]
        result = child_memory(vocab, seq, path, extra == "1") if kind == "memory" \
            else child_time(vocab, seq, path, int(extra))
        print(json.dumps(result))
        return

    load_start = os.getloadavg()
    started = time.time()
    rows = []
    for vocab in a.vocab:
        for seq in a.seq:
            row = {"vocab": vocab, "seq_len": seq, "batch": 1}
            for path in ("logits", "lean"):
                for weighted in (False, True):
                    m = run_child(["memory", str(vocab), str(seq), path, str(int(weighted))])
                    row[f"{path}_{'weighted' if weighted else 'unweighted'}_memory"] = m
                row[f"{path}_time"] = run_child(["time", str(vocab), str(seq), path, str(a.repeats)])
                print(f"V={vocab} T={seq} {path}: step peak {row[f'{path}_unweighted_memory']['step_peak_mib']:.0f} MiB, "
                      f"loss {row[f'{path}_time']['unweighted_s']:.3f}s / weighted {row[f'{path}_time']['weighted_s']:.3f}s",
                      flush=True)
            lw, lu = row["logits_weighted_memory"], row["logits_unweighted_memory"]
            nw, nu = row["lean_weighted_memory"], row["lean_unweighted_memory"]
            row["ratios"] = {
                "lean_over_logits_step_peak": nw["step_peak_mib"] / lw["step_peak_mib"],
                "lean_over_logits_step_peak_unweighted": nu["step_peak_mib"] / lu["step_peak_mib"],
                "lean_over_logits_process_peak_rss": nw["process_peak_rss_mib"] / lw["process_peak_rss_mib"],
                "lean_over_logits_time_weighted": row["lean_time"]["weighted_s"] / row["logits_time"]["weighted_s"],
                "lean_over_logits_time_unweighted": row["lean_time"]["unweighted_s"] / row["logits_time"]["unweighted_s"],
                "lean_weighted_over_unweighted_time": row["lean_time"]["weighted_s"] / row["lean_time"]["unweighted_s"],
                "logits_weighted_over_unweighted_time":
                    row["logits_time"]["weighted_s"] / row["logits_time"]["unweighted_s"],
            }
            rows.append(row)
    big = [r for r in rows if r["vocab"] >= 100000]
    targets = {
        "lean_memory_le_20pct_at_128k": all(r["ratios"]["lean_over_logits_step_peak"] <= 0.2 for r in big),
        "weighted_lean_within_5pct": all(abs(r["ratios"]["lean_weighted_over_unweighted_time"] - 1) <= 0.05
                                         for r in rows),
        "lean_no_slower_than_logits": all(r["ratios"]["lean_over_logits_time_weighted"] <= 1.0 for r in rows),
    }
    env = environment()
    payload = {"bench": "lean_loss", "date": env["time"], "commit": env["commit"], "machine": env["cpu"],
               "environment": env, "device": rows[0]["lean_unweighted_memory"]["device"] if rows else None,
               "model": {"kind": "LlamaForCausalLM (random init)", "layers": LAYERS, "hidden": HIDDEN,
                         "tied": False, "batch": 1},
               "load_start": load_start, "load_end": os.getloadavg(), "wall_s": time.time() - started,
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows, "targets": targets}
    path = save_json(a.out, payload)
    table = [[r["vocab"], r["seq_len"], f"{r['logits_weighted_memory']['step_peak_mib']:.0f}",
              f"{r['lean_weighted_memory']['step_peak_mib']:.0f}", f"{r['ratios']['lean_over_logits_step_peak']:.3f}",
              f"{r['ratios']['lean_over_logits_process_peak_rss']:.3f}",
              f"{r['logits_time']['weighted_s']:.3f}", f"{r['lean_time']['weighted_s']:.3f}",
              f"{r['ratios']['lean_over_logits_time_weighted']:.2f}",
              f"{r['ratios']['lean_weighted_over_unweighted_time']:.3f}"] for r in rows]
    print(markdown_table(["V", "T", "logits step MiB", "lean step MiB", "lean/logits mem", "lean/logits process RSS",
                          "logits loss s", "lean loss s", "lean/logits time", "lean weighted/unweighted"], table))
    print(json.dumps(targets))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
