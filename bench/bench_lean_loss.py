"""The lean loss (dataflex.core.lean_loss) against the logits path: peak memory and time, V = 32k / 128k.

A random-init HF Llama (2 layers, hidden 256, untied lm_head), batch 1, seq_len 1024 and 2048, in
one run:

- memory: a fresh subprocess per (V, seq_len, path, weighting) builds the model, then does one
  training step (forward, `flex.loss`-style weighted loss through `LossWrapper`, backward). CPU:
  the peak RSS of the step above the RSS just before it (`/proc/self/clear_refs` resets the peak;
  `bench.common.measure_peak`), and the process's whole peak RSS (`ru_maxrss`). CUDA:
  `max_memory_allocated` above `memory_allocated` before the step.
- time: one subprocess per (V, seq_len, path) times the loss alone (head + per-token loss +
  weighting + backward into the hidden states and the head) from fixed hidden states, in three
  weightings taking turns, median of `--repeats`: `unweighted` (no plugin), `weighted` (fixed sample and
  token weights and a global denominator, known before the losses: the lean path forms its gradients in
  the forward), `focal` (focal's token weights from each token's own loss, told to the lean path as
  `token_weights_of_loss`, as the session does for `FocalReweighter`: gradients formed in the forward too)
  and `loss_weighted` (the same weights computed from the losses with no hint, as for a reweighter whose
  weights need every loss (tilted, rho-1): the lean backward recomputes the logits).

Ratios are against the logits path measured in the same run. Targets (issue 22): lean peak memory
<= 20% of the logits path's at V = 128k; weighted lean within 5% of unweighted lean time; lean no
slower than logits.

    python bench/bench_lean_loss.py                      # -> bench/results/lean_loss.json
    python bench/bench_lean_loss.py --vocab 32000 --seq 1024 --repeats 2    # a quick look

`--train`: whole training runs instead, `launch/train.py model=hf +reweighter=focal` on a local
random-init Llama (2 layers, hidden 256, vocabulary 32000 rows; its own small BPE tokenizer, so the
logits are 32000 wide whatever the tokens), once with the lean default and once with
`trainer.lean_loss=false`; each run's peak RSS is its process's (`ru_maxrss` of the waited-for child,
read by an intermediate process that launches only that run), with its losses from summary.json:

    python bench/bench_lean_loss.py --train              # -> bench/results/lean_loss_train.json

`--scoring`: the gradient engine's signals (ghost norms, dots against a batch gradient) of a batch
on the same random-init Llama, `TorchInterface(lean=True)` vs `lean=False`, peak RSS of each call
in a fresh subprocess and the two results compared:

    python bench/bench_lean_loss.py --scoring            # -> bench/results/lean_loss_scoring.json
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


WEIGHTINGS = ("unweighted", "weighted", "focal", "loss_weighted")


def wrapper(batch, weighted):
    """`LossWrapper` without plugin (every weight 1), with fixed sample and token weights and a global
    denominator (`weighted`: known before the losses, as the session's mixer loss weights or the HF Trainer's
    accumulation path give them: `known_weights`), or with token weights computed from the losses: focal's
    (1 - p)^2, p = exp(-l), told to the lean path as a function of each token's loss (`focal`, as the session
    tells it for FocalReweighter) or not (`loss_weighted`, as for a reweighter whose weights need every loss)."""
    import torch

    from dataflex.core.loss import LossWrapper
    from dataflex.reweighters.focal import focal_weights
    weighted = {False: "unweighted", True: "weighted"}.get(weighted, weighted)
    if weighted == "unweighted":
        return LossWrapper()
    if weighted in ("focal", "loss_weighted"):
        fn = LossWrapper(weigh=lambda signal, b: {"token_weights": focal_weights(signal["token_loss"]).float()})
        if weighted == "focal":
            fn.known_weights = lambda b: {"token_weights_of_loss": focal_weights}
        return fn
    g = torch.Generator().manual_seed(7)
    answer = {"sample_weights": torch.rand(1, generator=g) + 0.5,
              "token_weights": torch.rand(batch["labels"].shape, generator=g) * 2,
              "denominator": torch.tensor(float(batch["labels"].numel()))}
    fn = LossWrapper(weigh=lambda signal, b: {k: v.to(signal["loss"].device) for k, v in answer.items()})
    fn.known_weights = lambda b: answer
    return fn


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
    fns = {w: wrapper(batch, w) for w in WEIGHTINGS}
    times, cpu = {w: [] for w in WEIGHTINGS}, {w: [] for w in WEIGHTINGS}
    losses = {}
    for r in range(repeats + 1):                    # the first round warms up
        k = r % len(WEIGHTINGS)
        order = WEIGHTINGS[k:] + WEIGHTINGS[:k]             # rotated, so that no weighting always runs first
        for weighted in order:
            hidden.grad = None
            head.weight.grad = None
            if cuda:
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            out = LeanOutput(hidden, head) if path == "lean" else head(hidden)
            loss = fns[weighted](out, batch)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if r:
                times[weighted].append(time.perf_counter() - t)
                cpu[weighted].append(time.process_time() - c)
            losses[weighted] = float(loss)
    # CPU seconds (all threads) as well as wall seconds: on shared cores the wall clock also counts the
    # time spent waiting for a core, the CPU time only the work
    result = {}
    for w in WEIGHTINGS:
        result |= {f"{w}_s": statistics.median(times[w]), f"{w}_cpu_s": statistics.median(cpu[w]),
                   f"{w}_runs_s": times[w], f"{w}_runs_cpu_s": cpu[w], f"loss_{w}": losses[w]}
    return result


# ---------------------------------------------------------------------------- --train: whole runs

TRAIN_ARGS = ["backend=torch", "+reweighter=focal", "trainer.max_steps=4", "trainer.global_batch_size=4",
              "trainer.eval_every=4", "trainer.max_val_samples=4", "logger=none", "trainer.plot=false",
              "trainer.ledger_flush_every=4"]


def make_model_dir(folder: Path, vocab: int, seq: int) -> Path:
    """A random-init Llama (HIDDEN, LAYERS, `vocab` rows) and a small BPE tokenizer of its own, saved
    as transformers saves them (nothing fetched)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    model, _ = build(vocab, seq)
    model.save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = [json.loads(x)["text"] for x in (ROOT / "data/default/prose/train.jsonl").read_text().splitlines()[:200]]
    tok.train_from_iterator(lines, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def child_launch(lean: bool, model_dir: str, work: str, seq: int) -> dict:
    """One training run as this process's only child: its peak RSS is ru_maxrss of RUSAGE_CHILDREN."""
    run_dir = Path(work) / ("lean" if lean else "logits")
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DATAFLEX_CACHE=str(Path(work) / f"cache_{int(lean)}"), OMP_NUM_THREADS=str(THREADS),
               PYTHONPATH=str(ROOT))
    args = [sys.executable, "launch/train.py", "model=hf", f"model.path={model_dir}", f"model.seq_len={seq}",
            *TRAIN_ARGS, f"trainer.lean_loss={str(lean).lower()}", f"hydra.run.dir={run_dir}"]
    t = time.time()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"lean_loss": lean, "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
            "wall_s": wall, "command": " ".join(["python", *args[1:-1]]), "summary": summary}


def main_train(vocab: int, seq: int) -> None:
    import tempfile
    load_start, started = os.getloadavg(), time.time()
    with tempfile.TemporaryDirectory() as work:
        model_dir = str(make_model_dir(Path(work) / "model", vocab, seq))
        runs = {name: run_child(["launch", str(vocab), str(seq), name, f"{model_dir}|{work}"])
                for name in ("lean", "logits")}
    env = environment()
    ratio = runs["lean"]["peak_rss_mib"] / runs["logits"]["peak_rss_mib"]
    payload = {"bench": "lean_loss_train", "date": env["time"], "commit": env["commit"], "machine": env["cpu"],
               "environment": env, "load_start": load_start, "load_end": os.getloadavg(),
               "wall_s": time.time() - started, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "model": {"kind": "LlamaForCausalLM (random init, local)", "layers": LAYERS, "hidden": HIDDEN,
                         "vocab": vocab, "tokenizer_vocab": 1000, "seq_len": seq, "tied": False},
               "train_args": TRAIN_ARGS, "runs": runs, "lean_over_logits_peak_rss": ratio}
    path = save_json("lean_loss_train.json", payload)
    for name, r in runs.items():
        print(f"{name}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.0f}s")
    print(f"lean / logits peak RSS {ratio:.3f}; saved {path}")


# -------------------------------------------------------------------- --scoring: the gradient engine

SCORED = "all"


def child_scoring(vocab: int, seq: int, lean: bool, batch_size: int) -> dict:
    """Ghost norms and dots of `batch_size` samples, each call's peak RSS above the RSS before it."""
    import torch

    from dataflex.grad import TorchInterface
    from dataflex.grad.params import select_params
    model, _ = build(vocab, seq)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (batch_size, seq + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(batch_size, seq),
             "position_ids": torch.arange(seq).expand(batch_size, seq)}
    target = {n: torch.randn(p.shape, generator=g) for n, p in select_params(model, SCORED).items()}
    interface = TorchInterface(model, lean=lean)
    norms, norm_s, norm_peak = measure_peak(lambda: interface.per_sample_grad_norms(batch, SCORED))
    dots, dot_s, dot_peak = measure_peak(lambda: interface.per_sample_grad_dots(batch, target, SCORED))
    return {"norms": norms.tolist(), "dots": dots.tolist(), "norms_s": norm_s, "dots_s": dot_s,
            "norms_peak_mib": norm_peak, "dots_peak_mib": dot_peak,
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def main_scoring(vocab: int, seq: int, batch_size: int) -> None:
    load_start, started = os.getloadavg(), time.time()
    runs = {name: run_child(["scoring", str(vocab), str(seq), name, str(batch_size)]) for name in ("lean", "logits")}
    lean, full = runs["lean"], runs["logits"]

    def rel(a, b):
        return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    env = environment()
    payload = {"bench": "lean_loss_scoring", "date": env["time"], "commit": env["commit"], "machine": env["cpu"],
               "environment": env, "load_start": load_start, "load_end": os.getloadavg(),
               "wall_s": time.time() - started, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "model": {"kind": "LlamaForCausalLM (random init)", "layers": LAYERS, "hidden": HIDDEN, "vocab": vocab,
                         "seq_len": seq, "batch": batch_size, "tied": False, "params": SCORED},
               "runs": runs,
               "ratios": {"lean_over_logits_norms_peak": lean["norms_peak_mib"] / full["norms_peak_mib"],
                          "lean_over_logits_dots_peak": lean["dots_peak_mib"] / full["dots_peak_mib"],
                          "lean_over_logits_norms_time": lean["norms_s"] / full["norms_s"],
                          "lean_over_logits_dots_time": lean["dots_s"] / full["dots_s"]},
               "max_rel_diff": {"norms": rel(lean["norms"], full["norms"]), "dots": rel(lean["dots"], full["dots"])}}
    path = save_json("lean_loss_scoring.json", payload)
    for name, r in runs.items():
        print(f"{name}: norms peak {r['norms_peak_mib']:.0f} MiB {r['norms_s']:.1f}s, "
              f"dots peak {r['dots_peak_mib']:.0f} MiB {r['dots_s']:.1f}s")
    print(json.dumps(payload["ratios"]), json.dumps(payload["max_rel_diff"]))
    print(f"saved {path}")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


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
    ap.add_argument("--train", action="store_true", help="whole launch/train.py runs, lean vs logits (peak RSS)")
    ap.add_argument("--scoring", action="store_true", help="ghost norms and dots, lean vs logits (peak RSS)")
    ap.add_argument("--batch", type=int, default=4, help="--scoring: samples scored")
    ap.add_argument("--time-only", action="store_true", help="the loss's time alone (no memory children), "
                    "-> bench/results/lean_loss_time.json")
    a = ap.parse_args()
    if a.child:
        import torch
        torch.set_num_threads(THREADS)
        kind, vocab, seq, path, extra = a.child[0], int(a.child[1]), int(a.child[2]), a.child[3], a.child[4]
        if kind == "launch":
            model_dir, work = extra.split("|")
            result = child_launch(path == "lean", model_dir, work, seq)
        elif kind == "scoring":
            result = child_scoring(vocab, seq, path == "lean", int(extra))
        else:
            result = child_memory(vocab, seq, path, extra == "1") if kind == "memory" \
                else child_time(vocab, seq, path, int(extra))
        print(json.dumps(result))
        return
    if a.train:
        main_train(a.vocab[0], a.seq[0] if a.seq != [1024, 2048] else 512)
        return
    if a.scoring:
        main_scoring(a.vocab[0], a.seq[0] if a.seq != [1024, 2048] else 256, a.batch)
        return

    load_start = os.getloadavg()
    started = time.time()
    rows = []
    for vocab in a.vocab:
        for seq in a.seq:
            row = {"vocab": vocab, "seq_len": seq, "batch": 1}
            for path in ("logits", "lean"):
                for weighted in (() if a.time_only else (False, True)):
                    m = run_child(["memory", str(vocab), str(seq), path, str(int(weighted))])
                    row[f"{path}_{'weighted' if weighted else 'unweighted'}_memory"] = m
                row[f"{path}_time"] = run_child(["time", str(vocab), str(seq), path, str(a.repeats)])
                peak = "" if a.time_only else \
                    f"step peak {row[f'{path}_unweighted_memory']['step_peak_mib']:.0f} MiB, "
                print(f"V={vocab} T={seq} {path}: {peak}CPU s " + ", ".join(
                    f"{w} {row[f'{path}_time'][f'{w}_cpu_s']:.3f}" for w in WEIGHTINGS), flush=True)
            row["ratios"] = {} if a.time_only else {
                "lean_over_logits_step_peak": row["lean_weighted_memory"]["step_peak_mib"]
                / row["logits_weighted_memory"]["step_peak_mib"],
                "lean_over_logits_step_peak_unweighted": row["lean_unweighted_memory"]["step_peak_mib"]
                / row["logits_unweighted_memory"]["step_peak_mib"],
                "lean_over_logits_process_peak_rss": row["lean_weighted_memory"]["process_peak_rss_mib"]
                / row["logits_weighted_memory"]["process_peak_rss_mib"]}
            lt, gt = row["lean_time"], row["logits_time"]
            for w in WEIGHTINGS:
                row["ratios"][f"lean_over_logits_time_{w}"] = lt[f"{w}_s"] / gt[f"{w}_s"]
                row["ratios"][f"lean_over_logits_cpu_time_{w}"] = lt[f"{w}_cpu_s"] / gt[f"{w}_cpu_s"]
            row["ratios"] |= {
                "lean_weighted_over_unweighted_time": lt["weighted_s"] / lt["unweighted_s"],
                "lean_weighted_over_unweighted_cpu_time": lt["weighted_cpu_s"] / lt["unweighted_cpu_s"],
                "lean_loss_weighted_over_unweighted_cpu_time": lt["loss_weighted_cpu_s"] / lt["unweighted_cpu_s"],
                "lean_focal_over_unweighted_cpu_time": lt["focal_cpu_s"] / lt["unweighted_cpu_s"],
                "logits_weighted_over_unweighted_time": gt["weighted_s"] / gt["unweighted_s"],
            }
            rows.append(row)
    big = [r for r in rows if r["vocab"] >= 100000]
    targets = {} if a.time_only else {
        "lean_memory_le_20pct_at_128k": all(r["ratios"]["lean_over_logits_step_peak"] <= 0.2 for r in big)}
    # the time targets: weights known before the losses (none, or given), or known as a function of each token's
    # loss (focal); weights computed from all the losses (loss_weighted) need one more head matmul on the lean
    # path, reported beside them
    targets |= {
        "weighted_lean_within_5pct": all(abs(r["ratios"]["lean_weighted_over_unweighted_time"] - 1) <= 0.05
                                         for r in rows),
        "lean_no_slower_than_logits": all(r["ratios"][f"lean_over_logits_time_{w}"] <= 1.0
                                          for r in rows for w in ("unweighted", "weighted")),
        "weighted_lean_within_5pct_cpu_time": all(abs(r["ratios"]["lean_weighted_over_unweighted_cpu_time"] - 1) <= 0.05
                                                  for r in rows),
        "lean_no_slower_than_logits_cpu_time": all(r["ratios"][f"lean_over_logits_cpu_time_{w}"] <= 1.0
                                                   for r in rows for w in ("unweighted", "weighted", "focal")),
        "focal_lean_within_5pct_of_unweighted_cpu_time": all(
            abs(r["ratios"]["lean_focal_over_unweighted_cpu_time"] - 1) <= 0.05 for r in rows),
        "loss_weighted_lean_no_slower_than_logits_cpu_time": all(
            r["ratios"]["lean_over_logits_cpu_time_loss_weighted"] <= 1.0 for r in rows),
    }
    env = environment()
    payload = {"bench": "lean_loss_time" if a.time_only else "lean_loss", "date": env["time"],
               "commit": env["commit"], "machine": env["cpu"], "environment": env,
               "device": "cuda" if _cuda() else "cpu", "repeats": a.repeats,
               "model": {"kind": "LlamaForCausalLM (random init)", "layers": LAYERS, "hidden": HIDDEN,
                         "tied": False, "batch": 1},
               "load_start": load_start, "load_end": os.getloadavg(), "wall_s": time.time() - started,
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows, "targets": targets}
    path = save_json("lean_loss_time.json" if a.time_only and a.out == "lean_loss.json" else a.out, payload)
    if a.time_only:
        table = [[r["vocab"], r["seq_len"]] + [f"{r['logits_time'][f'{w}_cpu_s']:.3f}" for w in WEIGHTINGS]
                 + [f"{r['lean_time'][f'{w}_cpu_s']:.3f}" for w in WEIGHTINGS]
                 + [f"{r['ratios'][f'lean_over_logits_cpu_time_{w}']:.2f}" for w in WEIGHTINGS]
                 + [f"{r['ratios'][f'lean_over_logits_time_{w}']:.2f}" for w in WEIGHTINGS]
                 + [f"{r['ratios']['lean_weighted_over_unweighted_cpu_time']:.3f}",
                    f"{r['ratios']['lean_focal_over_unweighted_cpu_time']:.3f}"] for r in rows]
        print(markdown_table(["V", "T"] + [f"logits {w} CPU s" for w in WEIGHTINGS]
                             + [f"lean {w} CPU s" for w in WEIGHTINGS]
                             + [f"lean/logits CPU {w}" for w in WEIGHTINGS]
                             + [f"lean/logits wall {w}" for w in WEIGHTINGS]
                             + ["lean weighted/unweighted CPU", "lean focal/unweighted CPU"], table))
        print(json.dumps(targets))
        print(f"saved {path}")
        return
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
