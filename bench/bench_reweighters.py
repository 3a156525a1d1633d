"""Each reweighter's cost as a fraction of a training step (target: at most 1%).

Every variant trains its own TinyGPT (same seed) with AdamW through DataFlex on batches of 16 x 128
tokens from the default corpus, stepped round-robin so a slow spell of the machine hits all alike.
For each variant, per step:

- `step ms`: the whole step (draw, forward, loss, backward, optimizer, end_step), median;
- `plugin ms`: the reweighter's own AFTER_LOSS time (the engine's trace), median;
- `weighting ms`: the reweighter's math alone (its pure function on the step's tensors), median;
  for Rho-1 and anchor the plugin time also holds a forward without gradients (the reference model's
  token losses; the batch's embeddings), reported apart as `forward ms`.

The ratio column is the plugin's share of the no-plugin step measured in the same run.

    .venv/bin/python bench/bench_reweighters.py [--steps 30] [--warmup 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import markdown_table  # noqa: E402

torch = common.setup_torch()

from dataflex.grad.interface import TorchInterface
from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402
from dataflex.reweighters import (  # noqa: E402
    AnchorReweighter,
    FocalReweighter,
    LossReweighter,
    Rho1Reweighter,
    TiltedReweighter,
    anchor_similarity,
    focal_weights,
    loss_weights,
    rho1_token_weights,
    tilted_weights,
)
from dataflex.session.flex import DataFlex  # noqa: E402

BATCH, SEQ, LR, SEED = 16, 128, 1e-3, 0


def new_model(vocab: int, seed: int = SEED) -> TinyGPT:
    return TinyGPT(vocab_size=vocab, seq_len=SEQ, seed=seed, **common.MODEL)


def variants(vocab: int) -> dict:
    reference = new_model(vocab, seed=1).eval().requires_grad_(False)
    return {
        "DataFlex, no plugin (reference step)": lambda: [],
        "loss (Sow et al., linupper r=0.4)": lambda: [LossReweighter(burnout_steps=0)],
        "tilted (t=1)": lambda: [TiltedReweighter(t=1.0)],
        "focal (gamma=2, token weights)": lambda: [FocalReweighter(gamma=2.0)],
        "rho1 (keep 0.6, token weights)": lambda: [Rho1Reweighter(reference=reference, keep_fraction=0.6)],
        "anchor (prose, 64 anchors)": lambda: [AnchorReweighter(anchor="prose", refresh_every=50)],
    }


def pure_cost(plugin, state) -> tuple[float, float]:
    """(seconds of the math alone, seconds of the extra forward) on this step's tensors."""
    t = time.perf_counter()
    forward = 0.0
    if isinstance(plugin, LossReweighter):
        loss_weights(state.losses, plugin.strategy, plugin.temperature)
    elif isinstance(plugin, TiltedReweighter):
        tilted_weights(state.losses, plugin.t)
    elif isinstance(plugin, FocalReweighter):
        focal_weights(state.token_losses, plugin.gamma)
    elif isinstance(plugin, Rho1Reweighter):
        f = time.perf_counter()
        ref = state.signals.probe(state.batch_ids, output="token_loss", interface=plugin.reference)
        forward = time.perf_counter() - f
        t = time.perf_counter()
        rho1_token_weights(state.token_losses, ref, state.token_mask, plugin.keep_fraction)
    elif isinstance(plugin, AnchorReweighter):
        f = time.perf_counter()
        emb = state.signals.probe(state.batch_ids, output="embedding")
        forward = time.perf_counter() - f
        t = time.perf_counter()
        torch.softmax(anchor_similarity(emb, plugin.anchors) / plugin.temperature, 0)
    return time.perf_counter() - t, forward


def run(warmup: int = 5, steps: int = 30) -> dict:
    domains = common.load_domains(SEQ)
    vocab = domains.tokenizer.vocab_size
    runs = {}
    for name, make in variants(vocab).items():
        model = new_model(vocab)
        plugins = make()
        flex = DataFlex(domains.train, BATCH, plugins, interface=TorchInterface(model), seed=SEED)
        runs[name] = {"model": model, "flex": flex, "plugin": plugins[0] if plugins else None,
                      "opt": torch.optim.AdamW(model.parameters(), lr=LR), "step": [], "plugin_s": [],
                      "pure": [], "forward": []}
    names = list(runs)
    for i in range(warmup + steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            r = runs[name]
            flex, model, opt = r["flex"], r["model"], r["opt"]
            key = f"{r['plugin'].name}/after_loss" if r["plugin"] else None
            before = flex.engine.traces.get(key, 0.0)
            t = time.perf_counter()
            batch = flex.next_batch()
            loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            flex.end_step()
            elapsed = time.perf_counter() - t
            if i >= warmup:
                r["step"].append(elapsed)
                if r["plugin"]:
                    r["plugin_s"].append(flex.engine.traces.get(key, 0.0) - before)
                    pure, forward = pure_cost(r["plugin"], flex.state)
                    r["pure"].append(pure)
                    r["forward"].append(forward)
    base = statistics.median(runs[names[0]]["step"])
    out = {"batch": BATCH, "seq": SEQ, "steps": steps, "warmup": warmup, "rows": []}
    for name in names:
        r = runs[name]
        med = (lambda xs: 1000 * statistics.median(xs) if xs else None)
        row = {"variant": name, "step_ms": med(r["step"]), "plugin_ms": med(r["plugin_s"]),
               "weighting_ms": med(r["pure"]), "forward_ms": med(r["forward"]) if any(r["forward"]) else None}
        row["plugin_share"] = row["plugin_ms"] / (1000 * base) if row["plugin_ms"] is not None else None
        row["weighting_share"] = row["weighting_ms"] / (1000 * base) if row["weighting_ms"] is not None else None
        out["rows"].append(row)
    return out


def fmt_ms(ms) -> str:
    return "—" if ms is None else (f"{ms:.2f}" if ms < 10 else f"{ms:.1f}")


def table(res: dict) -> str:
    def pct(x):
        return "—" if x is None else f"{100 * x:.2f}%"
    rows = [[r["variant"], fmt_ms(r["step_ms"]), fmt_ms(r["plugin_ms"]), pct(r["plugin_share"]),
             fmt_ms(r["weighting_ms"]), pct(r["weighting_share"]), fmt_ms(r["forward_ms"])] for r in res["rows"]]
    title = (f"**Reweighters (TinyGPT 0.94M params, batch {res['batch']} x {res['seq']} tokens, median of "
             f"{res['steps']} steps after {res['warmup']}, round-robin; shares of the no-plugin step)**\n\n")
    return title + markdown_table(["reweighter", "step ms", "plugin ms", "plugin share", "weighting ms",
                                   "weighting share", "forward ms (in plugin)"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    print(f"$ {common.command_line()}")
    res = run(args.warmup, args.steps)
    print(table(res))
    common.save_json("reweighters.json", {**res, "command": common.command_line(), "env": common.environment()})


if __name__ == "__main__":
    main()
