"""One DataFlexTrainer run with the bandit mixer, the loss reweighter and the loss selector, checkpoints every 3
steps, that may die at a step and may resume from its last checkpoint; and the comparison of two such runs.
Used by tests/test_hf_trainer.py and tests/test_hf_trainer_deepspeed.py in the test's own process (dying by an
exception) and as a script (dying by a real SIGKILL):

    python tests/hf_trainer_resume.py OUT [--accumulation K] [--kill-at STEP] [--resume] [--zero STAGE]

writes OUT's run folder (metrics.jsonl, ledger/), Trainer's checkpoints and, when it trains to the end, the
final weights in OUT/final.pt. `--zero` runs under Trainer's DeepSpeed (`TrainingArguments(deepspeed=...)`)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import synthetic_domains
from test_hf import tiny_model
from transformers import TrainerCallback, TrainingArguments

import dataflex
from dataflex.integrations.hf_trainer import DataFlexTrainer
from dataflex.mixers import BanditMixer
from dataflex.reweighters import LossReweighter
from dataflex.selectors import LossSelector

SAVE_STEPS, STEPS = 3, 6


def zero_config(stage: int) -> dict:
    """A DeepSpeed config for Trainer (its "auto" values filled from the arguments and dataflex's batch)."""
    return {"zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "steps_per_print": 10 ** 9}


def deepspeed_on_cpu() -> None:
    """What DeepSpeed needs on a machine without CUDA: its CPU accelerator, and this environment's ninja on PATH
    (for the ops it builds)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def build(folder, accumulation: int = 1, zero: int | None = None, domains=None, **kw):
    """The trainer, its model and its DataFlex session; `kw` goes to TrainingArguments. The model is built
    before TrainingArguments: under ZeRO-3 transformers would build it already partitioned after them."""
    model = tiny_model("llama", vocab=64, seed=1)
    flex = dataflex.DataFlex(synthetic_domains(16) if domains is None else domains, global_batch_size=8, seed=3,
                             plugins=[BanditMixer(), LossReweighter(burnout_steps=0), LossSelector(keep_fraction=0.5)])
    if zero is not None:
        from dataflex.backends.base import ensure_process_env

        deepspeed_on_cpu()
        ensure_process_env()          # what a launcher sets; a group of one
        kw["deepspeed"] = zero_config(zero)
    else:
        kw["use_cpu"] = True
    args = TrainingArguments(output_dir=str(folder), max_steps=STEPS, learning_rate=1e-3, logging_steps=1,
                             report_to=[], save_strategy="steps", save_steps=SAVE_STEPS, disable_tqdm=True, seed=0,
                             gradient_accumulation_steps=accumulation, per_device_train_batch_size=8 // accumulation,
                             **kw)
    return DataFlexTrainer(model=model, flex=flex, args=args), model, flex


class DieAt(TrainerCallback):
    """Dies at the end of optimizer step `step` (after its update and its dataflex record, before any later
    save), the run's records flushed first so that the folder holds records past the last checkpoint, as a
    kill can leave it. `die` is how: a real SIGKILL here, an exception in the test's own process."""

    def __init__(self, trainer, step: int, die=None):
        self.trainer, self.step = trainer, step
        self.die = die or (lambda: os.kill(os.getpid(), signal.SIGKILL))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.trainer.flex_callback.out.flush()
            self.die()


class Crash(Exception):
    pass


def crash():
    raise Crash()


def train_or_crash(trainer, crash_at=None, resume=None) -> bool:
    """Train (resuming from `resume`), or die by an exception at the end of optimizer step `crash_at` (see
    DieAt): whether it trained to the end."""
    if crash_at:
        trainer.add_callback(DieAt(trainer, crash_at, crash))
        with pytest.raises(Crash):
            trainer.train()
        return False
    trainer.train(resume_from_checkpoint=resume)
    return True


def crashed_and_resumed(run_in, folder, crash_at: int, checkpoint: int, steps: int) -> tuple:
    """`run_in(folder, crash=None, resume=None)` -> a trainer that trained to the end (None when it crashed):
    uninterrupted in `folder`/a; crashed at step `crash_at` in `folder`/b, then resumed from its checkpoint at step
    `checkpoint`. Asserts the same metrics lines and final weights, bit for bit; returns both trainers."""
    from dataflex.integrations.hf_trainer import STATE_FILE

    folder = Path(folder)
    a = run_in(folder / "a")
    run_in(folder / "b", crash=crash_at)
    assert (folder / "b" / f"checkpoint-{checkpoint}" / STATE_FILE).is_file()
    b = run_in(folder / "b", resume=True)
    lines = [(folder / f / "metrics.jsonl").read_text() for f in ("a", "b")]
    assert lines[0] == lines[1] and len(lines[0].splitlines()) == steps
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    return a, b


def run(folder, crash_at=None, resume=None, **kw):
    """build's trainer, model and session once trained to the end in this process; None when it died at
    `crash_at`. `kw` goes to build."""
    trainer, model, flex = build(folder, **kw)
    return (trainer, model, flex) if train_or_crash(trainer, crash_at, resume) else None


def records(folder) -> tuple:
    """A run folder's metrics lines and its ledger, in a fixed order."""
    lines = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    ledger = pd.read_parquet(Path(folder) / "ledger").sort_values(["step", "sample_id", "rank"]).reset_index(drop=True)
    return lines, ledger


def assert_same_run(folder_a, folder_b, weights_a: dict, weights_b: dict) -> None:
    """Two runs of STEPS steps recorded the same metrics lines (losses, domain weights, plugin statistics) and the
    same ledger, and ended with the same weights, bit for bit."""
    (lines_a, ledger_a), (lines_b, ledger_b) = records(folder_a), records(folder_b)
    assert [x["step"] for x in lines_b] == list(range(STEPS))
    assert lines_a == lines_b
    pd.testing.assert_frame_equal(ledger_a, ledger_b)
    assert weights_a.keys() == weights_b.keys()
    for n, p in weights_a.items():
        assert torch.equal(weights_b[n], p), n


def kill_then_resume(folder, *flags: str) -> None:
    """This script in `folder`/b with `flags`, SIGKILLed (by itself: deterministic) at the end of step 5, after
    Trainer completed checkpoint-3 and with the records of steps 3-4 on disk, then resumed by a new process; and
    uninterrupted in `folder`/a. Asserts that both ended the same (assert_same_run), bit for bit."""
    from conftest import launch_in_group, script_env

    from dataflex.integrations.hf_trainer import STATE_FILE
    from dataflex.utils.safeload import load_weights_only

    folder = Path(folder)

    def launch(out, *more):
        return launch_in_group([sys.executable, __file__, str(folder / out), *flags, *more], script_env(), timeout=300)

    killed = launch("b", "--kill-at", "5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (folder / "b" / "checkpoint-3" / STATE_FILE).is_file() and not (folder / "b" / "final.pt").exists()
    lines, ledger = records(folder / "b")
    assert [x["step"] for x in lines] == sorted(ledger.step.unique()) == [0, 1, 2, 3, 4]     # past the checkpoint
    for out, more in (("b", ["--resume"]), ("a", [])):
        done = launch(out, *more)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(folder / "a", folder / "b", *(load_weights_only(folder / f / "final.pt") for f in "ab"))


def final_weights(trainer, model) -> dict:
    """Every parameter in full (gathered from ZeRO-3's partitions under DeepSpeed)."""
    engine = trainer.model_wrapped
    if not callable(getattr(engine, "zero_optimization_stage", None)):
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--zero", type=int)
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    trainer, model, _ = build(a.out, a.accumulation, a.zero)
    if a.kill_at:
        trainer.add_callback(DieAt(trainer, a.kill_at))
    trainer.train(resume_from_checkpoint=a.resume or None)
    torch.save(final_weights(trainer, model), Path(a.out) / "final.pt")


if __name__ == "__main__":
    main()
