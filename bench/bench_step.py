"""Training step time with each DataFlex plugin, as ratios to the same loop without DataFlex.

Every variant trains its own TinyGPT (same seed, so the same initial weights) with AdamW on batches of
16 x 128 tokens from the default corpus. The baseline is a plain PyTorch loop: 16 sample ids drawn
uniformly at random, mean cross-entropy over label tokens, backward, AdamW step. The DataFlex variants
run the loop of dataflex/session.py instead: next_batch() -> forward -> flex.loss -> backward ->
AdamW step -> end_step().

The variants are stepped round-robin (one step of each in turn, the order rotating every step), so a
slow spell of the machine hits all of them alike; the per-step time is the median over the timed
steps after the warm-up steps. Each step is also split into phases (sample / forward+loss /
backward+optimizer / end_step) to show where the overhead sits.

The optional DeepSpeed part (ZeRO 0, fp32, the CPU accelerator) runs in a subprocess, since it needs a
process group: the plain loop on DeepSpeed's engine, and the engine with DataFlex, each against the
plain PyTorch loop measured in that same process.

    .venv/bin/python bench/bench_step.py [--steps 40] [--warmup 10] [--deepspeed]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Clock, fmt_ms, fmt_ratio, markdown_table, median_ms  # noqa: E402

torch = common.setup_torch()
import torch.nn.functional as F  # noqa: E402

from dataflex.data.mixture import MixtureDataset
from dataflex.grad.interface import TorchInterface
from dataflex.mixers import BanditMixer, StaticMixer  # noqa: E402
from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402
from dataflex.reweighters import LossReweighter  # noqa: E402
from dataflex.selectors import LossSelector  # noqa: E402
from dataflex.session.flex import DataFlex  # noqa: E402

BATCH, SEQ, LR, SEED = 16, 128, 1e-3, 0
PHASES = ("sample", "forward", "backward", "end_step")

# name -> plugin factory (None: the plain loop without DataFlex)
VARIANTS = {
    "plain PyTorch loop (baseline)": None,
    "DataFlex, no plugin": lambda: [],
    "+ static mixer": lambda: [StaticMixer("uniform")],
    "+ bandit mixer": lambda: [BanditMixer()],
    "+ loss selector (keep 0.5)": lambda: [LossSelector(keep_fraction=0.5)],
    "+ loss reweighter (burnout 0)": lambda: [LossReweighter(burnout_steps=0)],
    "bandit + selector + reweighter": lambda: [BanditMixer(), LossSelector(keep_fraction=0.5),
                                               LossReweighter(burnout_steps=0)],
}
BASELINE = "plain PyTorch loop (baseline)"


def new_model(vocab: int) -> TinyGPT:
    return TinyGPT(vocab_size=vocab, seq_len=SEQ, seed=SEED, **common.MODEL)


class _Loop:
    """`step` (a DeepSpeed engine's backward+step) replaces the plain AdamW update when given."""

    def optimize(self, loss):
        if self._step is None:
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self._step(loss)


class PlainLoop(_Loop):
    """The loop without DataFlex: uniform random batches, plain token-mean cross-entropy."""

    def __init__(self, model, data: MixtureDataset, forward=None, step=None):
        self.model, self.data = model, data
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR) if step is None else None
        self.forward = forward or (lambda b: model(b["input_ids"]))
        self._step = step
        self.g = torch.Generator().manual_seed(SEED)

    def step(self) -> dict:
        c = Clock()
        ids = torch.randint(len(self.data), (BATCH,), generator=self.g)
        batch = {"input_ids": self.data.input_ids[ids], "labels": self.data.labels[ids],
                 "loss_mask": self.data.loss_mask[ids], "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}
        c.lap("sample")
        logits = self.forward(batch)
        token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none")
        mask = batch["loss_mask"].reshape(-1).float()
        loss = (token * mask).sum() / mask.sum()
        c.lap("forward")
        self.optimize(loss)
        c.lap("backward")
        c.lap("end_step")
        self.last_loss = float(loss.detach())
        return c.parts


class FlexLoop(_Loop):
    """The same loop with DataFlex drawing the batch, weighing the loss and running the plugins."""

    def __init__(self, model, train: dict, plugins, interface=None, forward=None, step=None):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR) if step is None else None
        self.forward = forward or (lambda b: model(b["input_ids"], position_ids=b["position_ids"]))
        self._step = step
        self.flex = DataFlex(train, BATCH, plugins, interface or TorchInterface(model), seed=SEED)

    def step(self) -> dict:
        c = Clock()
        batch = self.flex.next_batch()
        c.lap("sample")
        loss = self.flex.loss(self.forward(batch), batch)
        c.lap("forward")
        self.optimize(loss)
        c.lap("backward")
        self.flex.end_step()
        c.lap("end_step")
        self.last_loss = float(loss.detach())
        return c.parts


def run_round_robin(loops: dict, warmup: int, steps: int) -> dict:
    """Step every loop once per round, rotating the order; keep the phases of the timed rounds."""
    names = list(loops)
    timed = {n: [] for n in names}
    for r in range(warmup + steps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            parts = loops[name].step()
            if r >= warmup:
                timed[name].append(parts)
    return timed


def summarise(timed: dict, baseline: str, loops: dict) -> dict:
    """Median and fastest step of each loop, each as a ratio to the baseline's median and fastest."""
    out = {}
    totals = {name: [sum(p.values()) for p in parts] for name, parts in timed.items()}
    base, base_min = median_ms(totals[baseline]), 1000 * min(totals[baseline])
    for name, parts in timed.items():
        total, fastest = median_ms(totals[name]), 1000 * min(totals[name])
        entry = {"ms_per_step": total, "ratio": total / base, "fastest_ms": fastest, "fastest_ratio": fastest / base_min,
                 "phases_ms": {ph: median_ms([p.get(ph, 0.0) for p in parts]) for ph in PHASES},
                 "steps_timed": len(parts), "step_ms": [round(1000 * t, 2) for t in totals[name]],
                 "final_loss": loops[name].last_loss}
        flex = getattr(loops[name], "flex", None)
        if flex is not None:
            n = flex.step
            entry["plugin_ms_per_step"] = {k: 1000.0 * v / n for k, v in flex.engine.traces.items()}
        out[name] = entry
    return out


def run_torch(warmup: int, steps: int) -> dict:
    domains = common.load_domains(SEQ)
    vocab = domains.tokenizer.vocab_size
    data = MixtureDataset(domains.train)
    loops = {}
    for name, factory in VARIANTS.items():
        model = new_model(vocab)
        loops[name] = PlainLoop(model, data) if factory is None else FlexLoop(model, domains.train, factory())
    timed = run_round_robin(loops, warmup, steps)
    return {"variants": summarise(timed, BASELINE, loops), "baseline": BASELINE, "warmup": warmup, "steps": steps,
            "batch": BATCH, "seq_len": SEQ, "vocab": vocab, "model": common.MODEL,
            "params": sum(p.numel() for p in new_model(vocab).parameters()),
            "train_samples": len(data)}


# -- DeepSpeed (subprocess) ------------------------------------------------------------------------
DS_VARIANTS = {
    "plain PyTorch loop (reference)": "torch",
    "DeepSpeed ZeRO-0 engine, plain loop": "ds",
    "DeepSpeed ZeRO-0 + DataFlex, no plugin": "ds-flex",
    "DeepSpeed ZeRO-0 + DataFlex, bandit + selector + reweighter": "ds-flex-all",
}
DS_BASELINE = "DeepSpeed ZeRO-0 engine, plain loop"


def deepspeed_worker(warmup: int, steps: int, out: Path) -> None:
    import time

    from dataflex.backends import DeepSpeedBackend, setup_distributed

    t0 = time.perf_counter()
    setup_distributed("deepspeed")
    domains = common.load_domains(SEQ)
    vocab = domains.tokenizer.vocab_size
    data = MixtureDataset(domains.train)
    loops, init_s = {}, {}
    for name, kind in DS_VARIANTS.items():
        t = time.perf_counter()
        model = new_model(vocab)
        if kind == "torch":
            loops[name] = PlainLoop(model, data)
        else:
            backend = DeepSpeedBackend(model, micro_batch_size=BATCH, zero_stage=0, lr=LR, grad_clip=0.0)
            if kind == "ds":
                loops[name] = PlainLoop(model, data, forward=backend.forward, step=backend.step)
            else:
                plugins = VARIANTS["bandit + selector + reweighter"]() if kind == "ds-flex-all" else []
                loops[name] = FlexLoop(model, domains.train, plugins, backend.interface, forward=backend.forward,
                                       step=backend.step)
        init_s[name] = time.perf_counter() - t
    setup_s = time.perf_counter() - t0
    timed = run_round_robin(loops, warmup, steps)
    result = {"variants": summarise(timed, DS_BASELINE, loops), "baseline": DS_BASELINE, "init_s": init_s,
              "setup_s": setup_s, "warmup": warmup, "steps": steps}
    for name, entry in result["variants"].items():
        entry["ratio_vs_plain_torch"] = entry["ms_per_step"] / result["variants"][
            "plain PyTorch loop (reference)"]["ms_per_step"]
    out.write_text(json.dumps(result, default=str))


def run_deepspeed(warmup: int, steps: int, timeout: int = 300) -> dict:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")       # same ninja => the cached op is reused
    env.setdefault("DS_ACCELERATOR", "cpu")
    # A cache of our own: the shm op is rebuilt whenever a different ninja touched the shared cache.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dataflex-bench" / "torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a group of one of its own
        env.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ds.json"
        cmd = [sys.executable, __file__, "--deepspeed-worker", str(out), "--warmup", str(warmup), "--steps", str(steps)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not out.exists():
            return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
        return json.loads(out.read_text())


# -- report ------------------------------------------------------------------------------------------
HEADER = ["variant", "ms/step", "ratio vs baseline", "fastest ms", "fastest ratio"]


def _row(name, e):
    return (name, fmt_ms(e["ms_per_step"]), fmt_ratio(e["ratio"]), fmt_ms(e["fastest_ms"]), fmt_ratio(e["fastest_ratio"]))


def table_torch(res: dict) -> str:
    v = res["variants"]
    return "\n".join([
        f"### Training step (TinyGPT {res['params'] / 1e6:.2f}M params, batch {BATCH} x {SEQ} tokens, median of "
        f"{res['steps']} steps after {res['warmup']} warm-up, variants round-robin)", "",
        markdown_table(HEADER, [_row(n, e) for n, e in v.items()]), "",
        "Phases, median ms/step (sample: drawing the batch, with a selector its probe forward; forward: "
        "forward + loss; backward: backward + AdamW; end_step: DataFlex's end_step()):", "",
        markdown_table(["variant"] + list(PHASES),
                       [(n, *(f"{e['phases_ms'][p]:.1f}" for p in PHASES)) for n, e in v.items()])])


def table_deepspeed(ds: dict) -> str:
    if "error" in ds:
        return f"DeepSpeed part not measured: {ds['error'].strip().splitlines()[-1] if ds['error'].strip() else '?'}"
    rows = [(*_row(n, e), fmt_ratio(e["ratio_vs_plain_torch"])) for n, e in ds["variants"].items()]
    return "\n".join([
        f"### DeepSpeed engine (ZeRO 0, fp32, CPU accelerator; its own process, median of {ds['steps']} steps "
        f"after {ds['warmup']} warm-up, round-robin with the plain PyTorch loop)", "",
        markdown_table(HEADER + ["ratio vs plain PyTorch"], rows), "",
        f"DeepSpeed set-up in that process: {ds['setup_s']:.0f} s (includes building the shm op when it is not "
        "cached)."])


def tables(result: dict) -> str:
    text = [table_torch(result["torch"])]
    if "deepspeed" in result:
        text += ["", table_deepspeed(result["deepspeed"])]
    return "\n".join(text)


def run(warmup: int = 10, steps: int = 40, deepspeed: bool = False, ds_warmup: int = 5, ds_steps: int = 20) -> dict:
    result = {"torch": run_torch(warmup, steps)}
    if deepspeed:
        result["deepspeed"] = run_deepspeed(ds_warmup, ds_steps)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first")
    p.add_argument("--deepspeed", action="store_true", help="also time DeepSpeed's engine (subprocess)")
    p.add_argument("--deepspeed-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.deepspeed_worker:
        deepspeed_worker(args.warmup, args.steps, Path(args.deepspeed_worker))
        return
    print(f"$ {common.command_line()}", flush=True)
    result = run(args.warmup, args.steps, args.deepspeed, min(args.warmup, 5), max(1, args.steps // 2))
    result["env"] = common.environment()
    print(tables(result))
    print(f"\nsaved {common.save_json('step.json', result)}")


if __name__ == "__main__":
    main()
