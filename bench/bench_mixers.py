"""Each mixer's update cost as a fraction of a training step (target: at most 1%, Aioli's LearnParams
steps excepted: they are training steps).

Every variant trains its own TinyGPT (same seed) with AdamW through DataFlex on batches of 16 x 128
tokens from the default corpus, stepped round-robin so a slow spell of the machine hits all alike.
Per variant:

- `step ms`: the whole step without the mixer's own time, median (what the model costs);
- `mixer ms/step`: the mixer's time at every event (the engine's traces: BEFORE_SAMPLE, BATCH_END),
  summed over the timed steps and divided by their number, i.e. amortised: ADO's refits, Sheared's
  and Aioli's validation probes fall on some steps only;
- `peak ms`: the mixer's most expensive single step (one refit, one evaluation);
- `share`: mixer ms/step over the no-plugin step's median.

Schedules are shortened so that updates happen inside the timed window: ADO refits every 20 steps
(the paper: 1000), Sheared probes 16 validation samples per domain every 10 steps, Aioli runs rounds
of 40 steps with 8 LearnParams steps (one evaluation of 16 samples per domain every 2 steps while it
learns). Real runs update far less often, so their share is lower by the same factor.

    .venv/bin/python bench/bench_mixers.py [--steps 40] [--warmup 5]
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

from dataflex.data.domains import MixtureDataset  # noqa: E402
from dataflex.grad.interface import TorchInterface
from dataflex.mixers import ADOMixer, AioliMixer, BanditMixer, ShearedMixer, StaticMixer  # noqa: E402
from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402
from dataflex.session.flex import DataFlex  # noqa: E402

BATCH, SEQ, LR, SEED = 16, 128, 1e-3, 0


def new_model(vocab: int, seed: int = SEED) -> TinyGPT:
    return TinyGPT(vocab_size=vocab, seq_len=SEQ, seed=seed, **common.MODEL)


def variants(domains) -> dict:
    reference = {d: 4.0 for d in domains.train}
    return {
        "DataFlex, no plugin (reference step)": lambda: [],
        "static (size, temperature 0.5)": lambda: [StaticMixer("size", temperature=0.5)],
        "bandit (count estimator)": lambda: [BanditMixer()],
        "bandit (draw=step)": lambda: [BanditMixer(draw="step")],
        "bandit, apply=loss": lambda: [BanditMixer(apply="loss")],
        "ado (refit every 20, 8 starts)": lambda: [ADOMixer(start_step=5, update_interval=20, n_starts=8)],
        "sheared (probe every 10, 16/domain)": lambda: [ShearedMixer(reference_loss=reference, update_every=10,
                                                                     val_samples=16)],
        "aioli (rounds of 40, 8 LearnParams steps)": lambda: [AioliMixer(lp_rounds=1, lp_steps=2, update_steps=40,
                                                                         val_samples=16)],
    }


def run(warmup: int = 5, steps: int = 40) -> dict:
    domains = common.load_domains(SEQ)
    vocab = domains.tokenizer.vocab_size
    val = MixtureDataset(domains.val)
    runs = {}
    for name, make in variants(domains).items():
        model = new_model(vocab)
        plugins = make()
        flex = DataFlex(domains.train, BATCH, plugins, interface=TorchInterface(model), seed=SEED,
                        datasets={"val": val})
        runs[name] = {"model": model, "flex": flex, "plugin": plugins[0] if plugins else None,
                      "opt": torch.optim.AdamW(model.parameters(), lr=LR), "step": [], "mixer": []}
    names = list(runs)
    for i in range(warmup + steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            r = runs[name]
            flex, model, opt = r["flex"], r["model"], r["opt"]
            before = sum(flex.engine.traces.values())
            t = time.perf_counter()
            batch = flex.next_batch()
            loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            flex.end_step()
            elapsed = time.perf_counter() - t
            spent = sum(flex.engine.traces.values()) - before
            if i >= warmup:
                r["step"].append(elapsed - spent)
                r["mixer"].append(spent)
    base = statistics.median(runs[names[0]]["step"])
    out = {"batch": BATCH, "seq": SEQ, "steps": steps, "warmup": warmup, "rows": []}
    for name in names:
        r = runs[name]
        mixer = r["mixer"] if r["plugin"] else []
        row = {"variant": name, "step_ms": 1000 * statistics.median(r["step"]),
               "mixer_ms": 1000 * sum(mixer) / len(mixer) if mixer else None,
               "peak_ms": 1000 * max(mixer) if mixer else None}
        row["share"] = row["mixer_ms"] / (1000 * base) if mixer else None
        out["rows"].append(row)
    return out


def fmt_ms(ms) -> str:
    return "—" if ms is None else (f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}")


def table(res: dict) -> str:
    def pct(x):
        return "—" if x is None else f"{100 * x:.2f}%"
    rows = [[r["variant"], fmt_ms(r["step_ms"]), fmt_ms(r["mixer_ms"]), pct(r["share"]), fmt_ms(r["peak_ms"])]
            for r in res["rows"]]
    title = (f"**Mixers (TinyGPT 0.94M params, batch {res['batch']} x {res['seq']} tokens, {res['steps']} steps after "
             f"{res['warmup']}, round-robin; mixer time amortised over the steps, share of the no-plugin step)**\n\n")
    return title + markdown_table(["mixer", "step ms (median)", "mixer ms/step", "share", "peak ms"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    print(f"$ {common.command_line()}")
    res = run(args.warmup, args.steps)
    print(table(res))
    common.save_json("mixers.json", {**res, "command": common.command_line(), "env": common.environment()})


if __name__ == "__main__":
    main()
