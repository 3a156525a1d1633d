"""Training step time on the Megatron back end, with and without DataFlex, as ratios in one run.

Every Megatron variant is a megatron.core GPTModel of the benchmark's TinyGPT sizes (d=128, 2 layers,
4 heads, seq 128, the corpus tokenizer's vocabulary), tensor and pipeline size 1, trained through
Megatron's `get_forward_backward_func` schedule, its DDP and `get_megatron_optimizer` (Adam) on
batches of 16 x 128 tokens of the default corpus; on a machine without CUDA through the CPU device
shim (dataflex/backends/megatron_cpu.py), as here.

- baseline, "Megatron, plain loop": 16 sample ids drawn uniformly at random, a loss_func taking the
  token mean of Megatron's per-token loss, the schedule (forward+backward), the optimizer step;
- "Megatron + DataFlex": `flex.next_batch()`, `backend.forward_backward(batch, flex.loss)` (the
  loss_func calls dataflex's loss wrapper: per-sample losses, gather, plugins, weighted scalar),
  `backend.step()`, `flex.end_step()`; with no plugin, and with bandit + loss reweighter (+ loss
  selector, whose probe runs the schedule in forward-only mode over twice the batch);
- reference: the plain PyTorch loop of bench_step.py on dataflex's TinyGPT (same sizes).

Variants are stepped round-robin (the order rotating), the median step after the warm-up is
reported, as in bench_step.py.

    .venv/bin/python bench/bench_megatron.py [--steps 20] [--warmup 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Clock, fmt_ms, fmt_ratio, markdown_table  # noqa: E402

torch = common.setup_torch()
import bench_step  # noqa: E402
from bench_step import BATCH, LR, SEED, SEQ, PlainLoop, run_round_robin, summarise  # noqa: E402

from dataflex.data.mixture import MixtureDataset
from dataflex.mixers import BanditMixer  # noqa: E402
from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402
from dataflex.reweighters import LossReweighter  # noqa: E402
from dataflex.selectors import LossSelector  # noqa: E402
from dataflex.session.flex import DataFlex  # noqa: E402

BASELINE = "Megatron, plain loop (baseline)"
VARIANTS = {
    "plain PyTorch loop on TinyGPT (reference)": "torch",
    BASELINE: None,
    "Megatron + DataFlex, no plugin": lambda: [],
    "Megatron + DataFlex, bandit + reweighter": lambda: [BanditMixer(), LossReweighter(burnout_steps=0)],
    "Megatron + DataFlex, bandit + selector + reweighter": lambda: [BanditMixer(), LossSelector(keep_fraction=0.5),
                                                                   LossReweighter(burnout_steps=0)],
}


def new_backend(vocab: int):
    from dataflex.backends import build_backend
    model = TinyGPT(vocab_size=vocab, seq_len=SEQ, seed=SEED, **common.MODEL)
    return build_backend("megatron", model, BATCH, 1, options={}, seed=SEED, lr=LR, warmup_steps=0, max_steps=0,
                         grad_clip=1.0)


class MegatronPlainLoop:
    """Megatron's schedule and optimizer with a plain token-mean loss_func on uniform random batches."""

    def __init__(self, backend, data: MixtureDataset):
        self.backend, self.data = backend, data
        self.g = torch.Generator().manual_seed(SEED)

    def step(self) -> dict:
        c = Clock()
        ids = torch.randint(len(self.data), (BATCH,), generator=self.g)
        batch = self.data.batch(ids)
        c.lap("sample")
        b = self.backend
        b.model.zero_grad_buffer()
        b.optimizer.zero_grad()
        out = {}

        def loss_of(tok, mb, index):
            mask = mb["loss_mask"].to(tok)
            loss = (tok * mask).sum() / mask.sum()
            out["loss"] = float(loss.detach())
            return loss, {}
        b._run(batch, BATCH, loss_of, forward_only=False)
        c.lap("forward")          # forward and backward run together in the schedule
        b.step()
        c.lap("backward")
        c.lap("end_step")
        self.last_loss = out["loss"]
        return c.parts


class MegatronFlexLoop:
    def __init__(self, backend, train: dict, plugins):
        self.backend = backend
        self.flex = DataFlex(train, BATCH, plugins, backend.interface, seed=SEED,
                             rank=backend.data_parallel_rank, world_size=backend.data_parallel_size)

    def step(self) -> dict:
        c = Clock()
        batch = self.flex.next_batch()
        c.lap("sample")
        loss = self.backend.forward_backward(batch, self.flex.loss)
        c.lap("forward")
        self.backend.step()
        c.lap("backward")
        self.flex.end_step()
        c.lap("end_step")
        self.last_loss = float(loss)
        return c.parts


def run(warmup: int, steps: int) -> dict:
    domains = common.load_domains(SEQ)
    vocab = domains.tokenizer.vocab_size
    data = MixtureDataset(domains.train)
    loops = {}
    for name, factory in VARIANTS.items():
        if factory == "torch":
            loops[name] = PlainLoop(bench_step.new_model(vocab), data)
        elif factory is None:
            loops[name] = MegatronPlainLoop(new_backend(vocab), data)
        else:
            loops[name] = MegatronFlexLoop(new_backend(vocab), domains.train, factory())
    timed = run_round_robin(loops, warmup, steps)
    return {"variants": summarise(timed, BASELINE, loops), "baseline": BASELINE, "warmup": warmup, "steps": steps,
            "batch": BATCH, "seq_len": SEQ, "vocab": vocab, "model": common.MODEL,
            "device": "cuda" if torch.cuda.is_available() else "cpu (device shim)"}


def table(result: dict) -> str:
    rows = [[name, fmt_ms(v["ms_per_step"]), fmt_ratio(v["ratio"]), fmt_ms(v["fastest_ms"]), fmt_ratio(v["fastest_ratio"])]
            for name, v in result["variants"].items()]
    return markdown_table(["variant", "ms/step", "ratio vs baseline", "fastest ms", "fastest ratio"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=str(common.RESULTS / "megatron.json"))
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    result = run(args.warmup, args.steps)
    result["command"] = common.command_line()
    result["env"], result["loadavg"] = common.environment(), os.getloadavg()
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
