"""What `DataFlexTrainer` costs against a plain `transformers.Trainer`: steps per second, same model and data.

    OMP_NUM_THREADS=2 python bench/bench_hf_trainer.py           # about a minute on two idle cores

The model: a random-init HF Llama (hidden 128, 2 layers, 4 heads, the embedded tokenizer's 2048-token
vocabulary); the data: the embedded corpus at seq_len `--seq-len` (128), global batch `--batch` (8), AdamW,
one process, `use_cpu=True`. Variants, each a fresh Trainer and model (seed 0) per round:

  plain      transformers.Trainer on the same samples (input_ids, labels = input_ids with -100 on padding),
             held in memory as tensors (the baseline's most favourable data path), shuffled by Trainer;
  dataflex   DataFlexTrainer, no plugin, its defaults (lean loss: no logits tensor): batches drawn by
             DataFlex from the memory-mapped shards, the ledger and metrics.jsonl written;
  dataflex-logits   the same with lean_loss=False (the loss from the logits, as plain Trainer computes it).

Rounds interleave the variants (plain, dataflex, dataflex-logits, then again) for `--rounds` rounds of
`--steps` optimizer steps each. A step's time is the interval between consecutive `on_step_end` callbacks
(data, forward, backward, optimizer step and every callback, dataflex's end_step included); the first
`--warmup` intervals of every run are dropped. Reported: median, mean and fastest ms per step of each variant
and their ratios to plain's (measured in the same run, so load shifts both alike; target <= 1.03x).
Results: bench/results/hf_trainer.json (date, commit, machine, load at start and end).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from common import ROOT, environment, load_domains, markdown_table, save_json, setup_torch  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the benches' 2)")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    torch = setup_torch()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import dataflex
    from dataflex.data.mixture import MixtureDataset
    from dataflex.integrations.hf_trainer import DataFlexTrainer

    transformers.logging.set_verbosity_error()
    domains = load_domains(args.seq_len)
    vocab = domains.tokenizer.vocab_size
    data = MixtureDataset(domains.train)
    ids, _, mask = data.rows(torch.arange(len(data)))
    plain_labels = ids.masked_fill(~mask, -100)

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": plain_labels[i]}

    class Steps(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    def model():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return transformers.AutoModelForCausalLM.from_config(cfg)

    def run(variant: str, folder: str) -> list:
        steps = Steps()
        targs = TrainingArguments(output_dir=folder, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                  learning_rate=1e-3, logging_steps=10**6, report_to=[], save_strategy="no",
                                  use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
        if variant == "plain":
            trainer = Trainer(model=model(), args=targs, train_dataset=Samples(), callbacks=[steps])
        else:
            flex = dataflex.DataFlex(domains.train, global_batch_size=args.batch, seed=0)
            trainer = DataFlexTrainer(model=model(), args=targs, flex=flex, callbacks=[steps],
                                      lean_loss=variant == "dataflex")
        trainer.train()
        gaps = [b - a for a, b in zip(steps.ends, steps.ends[1:])]
        return gaps[args.warmup:]

    variants = ("plain", "dataflex", "dataflex-logits")
    times = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in variants:
                times[v] += run(v, os.path.join(tmp, f"{v}-{r}"))
                print(f"round {r + 1}/{args.rounds} {v}: {1000 * statistics.median(times[v]):.1f} ms/step so far",
                      file=sys.stderr, flush=True)
    base_med, base_mean = statistics.median(times["plain"]), statistics.mean(times["plain"])
    out = {"variants": {}, "baseline": "plain"}
    rows = []
    for v in variants:
        med, mean = statistics.median(times[v]), statistics.mean(times[v])
        out["variants"][v] = {"ms_per_step_median": round(1000 * med, 2), "ms_per_step_mean": round(1000 * mean, 2),
                              "steps_timed": len(times[v]), "ratio_median": round(med / base_med, 3),
                              "ratio_mean": round(mean / base_mean, 3),
                              "ms_per_step_fastest": round(1000 * min(times[v]), 2),
                              "ratio_fastest": round(min(times[v]) / min(times["plain"]), 3),
                              "steps_per_s": round(1 / med, 2)}
        rows.append([v, f"{1000 * med:.1f}", f"{1000 * mean:.1f}", f"{med / base_med:.3f}", f"{mean / base_mean:.3f}",
                     f"{min(times[v]) / min(times['plain']):.3f}"])
    table = markdown_table(["variant", "median ms/step", "mean ms/step", "ratio (median)", "ratio (mean)",
                            "ratio (fastest)"], rows)
    print(table)
    env = environment()
    save_json("hf_trainer.json", {
        "bench": "hf_trainer", "command": "OMP_NUM_THREADS=2 python bench/bench_hf_trainer.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "commit": env["commit"], "machine": env,
        "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
        "uptime": os.popen("uptime").read().strip(),
        "settings": {**vars(args), "torch_threads": torch.get_num_threads(), "model": "llama hidden 128, 2 layers, 4 heads", "vocab": vocab,
                     "transformers": transformers.__version__, "repo": str(ROOT.name)},
        **out, "table": table})


if __name__ == "__main__":
    main()
