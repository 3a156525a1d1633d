"""LESS scoring throughput against a training step's, measured in one run.

    .venv/bin/python bench/bench_scoring.py                  # 5 rounds (about 3 minutes on 2 idle cores)
    .venv/bin/python bench/bench_scoring.py --quick          # 2 rounds, no all-parameter dense projection

Pool samples per second through what `LessSelector.checkpoint_cosines` does for each chunk of the
pool (exact per-sample gradients by torch.func, LESS's Adam feature with real AdamW moments, the
projection, L2 normalisation, mean cosines with 16 target features), for LoRA r=8 adapters and for
all parameters, with the default sparse projector (`SparseProjector`) and TRAK/LESS's dense
Rademacher one, against the samples per second of plain training steps (forward, backward, AdamW)
of the same TinyGPT on the same 16 x 128-token batch. The baseline of the scoring rows is LESS's own
per-sample loop: one batch-size-1 backward per sample, then the Adam feature and the dense
Rademacher projection of the 16 gradients. Variants are interleaved (one call each per round), each
warmed by one untimed call (a dense matrix that fits the projector's 256 MB cache is then reused,
as it is over a real pool); medians. Device: CUDA when available, else the CPU. Nothing asserts on
time. JSON: bench/results/scoring.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import fmt_ratio, markdown_table  # noqa: E402

torch = common.setup_torch()

from dataflex.core.loss import per_sample_loss  # noqa: E402
from dataflex.data.mixture import MixtureDataset  # noqa: E402
from dataflex.grad.api import per_sample_grads
from dataflex.grad.params import select_params  # noqa: E402
from dataflex.grad.projection import RademacherProjector, SparseProjector
from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402
from dataflex.selectors.less.math import adam_feature, l2_normalize, subtask_cosines  # noqa: E402

BATCH, SEQ, LORA_RANK, SEED, TARGETS = 16, 128, 8, 0, 16
TRAIN = "training step, all parameters (baseline)"
LOOP = "LESS's per-sample loop, LoRA: batch-1 backwards + dense Rademacher (reference)"


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def setup(dim: int):
    dev = device()
    domains = common.load_domains(SEQ)
    data = MixtureDataset(domains.train)
    ids = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED))[:BATCH + TARGETS]
    full = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in data.batch(ids).items()}
    batch = {k: full[k][:BATCH] for k in ("input_ids", "labels", "loss_mask", "position_ids")}
    target = {k: full[k][BATCH:] for k in ("input_ids", "labels", "loss_mask", "position_ids")}
    vocab = domains.tokenizer.vocab_size
    models = {}
    for kind in ("all", "lora"):
        m = TinyGPT(vocab_size=vocab, seq_len=SEQ, lora_rank=LORA_RANK if kind == "lora" else 0, seed=SEED,
                    **common.MODEL).to(dev)
        if kind == "lora":
            for name, p in m.named_parameters():
                p.requires_grad_("lora_" in name)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
        for _ in range(2):                                   # real moments for the Adam feature
            train_step(m, opt, batch)
        named = select_params(m, kind)
        moments = (torch.cat([opt.state[p]["exp_avg"].flatten() for p in named.values()]).cpu(),
                   torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in named.values()]).cpu(), (0.9, 0.95),
                   opt.param_groups[0]["eps"])
        models[kind] = {"model": m, "opt": opt, "moments": moments, "params": sum(p.numel() for p in named.values())}
    return batch, target, models, vocab


def train_step(m, opt, batch):
    logits = m(batch["input_ids"], position_ids=batch["position_ids"])
    per_sample_loss(logits, batch["labels"], batch["loss_mask"]).mean().backward()
    opt.step()
    opt.zero_grad()


def target_features(m, kind, target, projector):
    g = per_sample_grads(m, target, kind).flat().float().cpu()
    return l2_normalize(projector.project(g).double()) if projector is not None else l2_normalize(g.double())


def scoring_call(m, kind, batch, moments, projector, tfeat):
    """One chunk of the pool, as LessSelector.checkpoint_cosines scores it."""
    def call():
        g = per_sample_grads(m, batch, kind).flat().float().cpu()
        feat = l2_normalize(projector.project(adam_feature(g, *moments)).double())
        return subtask_cosines(feat, tfeat, torch.zeros(len(tfeat), dtype=torch.long), 1, normalize=False)
    return call


def loop_call(m, kind, batch, moments, projector, tfeat):
    """LESS's reference: a batch-size-1 backward per sample, then the dense projection of the block."""
    named = list(select_params(m, kind).values())

    def call():
        m.eval()
        rows = []
        for i in range(len(batch["input_ids"])):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            loss = per_sample_loss(m(one["input_ids"], position_ids=one["position_ids"]), one["labels"],
                                   one["loss_mask"])[0]
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, named)]).float().cpu())
        m.train()
        feat = l2_normalize(projector.project(adam_feature(torch.stack(rows), *moments)).double())
        return subtask_cosines(feat, tfeat, torch.zeros(len(tfeat), dtype=torch.long), 1, normalize=False)
    return call


def run(rounds: int = 5, dim: int = 2048, dense_all: bool = True) -> dict:
    batch, target, models, vocab = setup(dim)
    sparse, dense = SparseProjector(dim, seed=SEED), RademacherProjector(dim, seed=SEED)
    variants = {}
    for kind in ("all", "lora"):
        variants[f"training step, {'all parameters' if kind == 'all' else 'LoRA r=8 adapters'}"
                 + (" (baseline)" if kind == "all" else "")] = \
            (lambda mm=models[kind]: train_step(mm["model"], mm["opt"], batch))
    lo, al = models["lora"], models["all"]
    tf = {(k, name): target_features(models[k]["model"], k, target, p)
          for k in ("all", "lora") for name, p in (("sparse", sparse), ("dense", dense))
          if not (k == "all" and name == "dense" and not dense_all)}
    variants[LOOP] = loop_call(lo["model"], "lora", batch, lo["moments"], dense, tf["lora", "dense"])
    variants["LESS scoring, LoRA r=8, sparse projector (default)"] = scoring_call(
        lo["model"], "lora", batch, lo["moments"], sparse, tf["lora", "sparse"])
    variants["LESS scoring, LoRA r=8, dense Rademacher"] = scoring_call(
        lo["model"], "lora", batch, lo["moments"], dense, tf["lora", "dense"])
    variants["LESS scoring, all parameters, sparse projector"] = scoring_call(
        al["model"], "all", batch, al["moments"], sparse, tf["all", "sparse"])
    if dense_all:
        variants["LESS scoring, all parameters, dense Rademacher"] = scoring_call(
            al["model"], "all", batch, al["moments"], dense, tf["all", "dense"])
    times = {k: [] for k in variants}
    for name, fn in variants.items():                  # warm: kernels, dense matrices into the cache
        fn()
    sync()
    for r in range(rounds):
        names = list(variants)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            t = time.perf_counter()
            variants[name]()
            sync()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times[TRAIN])
    loop = statistics.median(times[LOOP])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"s_per_call": med, "fastest_s": min(ts), "samples_per_s": BATCH / med,
                      "ratio_vs_training": (BATCH / med) / (BATCH / base),
                      "speedup_vs_loop": loop / med if name.startswith("LESS") else None, "calls": len(ts)}
    return {"variants": rows, "baseline": TRAIN, "loop": LOOP, "batch": BATCH, "seq_len": SEQ, "dim": dim,
            "rounds": rounds, "device": str(device()), "vocab": vocab, "model": common.MODEL,
            "params": {"all": al["params"], "lora": lo["params"]}}


def table(res: dict) -> str:
    rows = []
    for name, v in res["variants"].items():
        rows.append([name, f"{v['samples_per_s']:,.1f}", f"{1000 * v['s_per_call']:,.1f}",
                     fmt_ratio(v["ratio_vs_training"]),
                     fmt_ratio(v["speedup_vs_loop"]) if v["speedup_vs_loop"] else "—"])
    head = (f"### LESS scoring vs training throughput (TinyGPT {res['params']['all']:,} params, LoRA "
            f"{res['params']['lora']:,}; batch {res['batch']} x {res['seq_len']}; d={res['dim']}; {res['device']}; "
            f"median of {res['rounds']} interleaved rounds)\n\n")
    return head + markdown_table(["variant", "samples/s", "ms per 16", "throughput vs training step",
                                  "speed-up vs per-sample loop"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dim", type=int, default=2048, help="projection dimension (configs/selector/less.yaml)")
    p.add_argument("--quick", action="store_true", help="2 rounds, no all-parameter dense projection")
    args = p.parse_args(argv)
    print(f"$ {common.command_line()}", flush=True)
    t = time.perf_counter()
    res = run(2 if args.quick else args.rounds, args.dim, dense_all=not args.quick)
    res.update({"command": common.command_line(), "env": common.environment(), "loadavg": os.getloadavg(),
                "wall_s": time.perf_counter() - t})
    print(table(res))
    print(f"\nsaved {common.save_json('scoring.json', res).relative_to(common.ROOT)} ({res['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
