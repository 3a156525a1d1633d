"""DataFlexTrainer under Trainer's own DeepSpeed (`TrainingArguments(deepspeed={ZeRO config})`, CPU, one
process): at ZeRO stages 1, 2 and 3 the gradient-norm selector's ghost norms go through the engine's interface
(which gathers ZeRO-3's partitioned parameters) and equal those of the same run without DeepSpeed, as do the
losses, the samples kept and the final weights; the norms themselves equal per-sample gradients taken one
sample at a time. A run dead after a checkpoint and resumed under ZeRO-2 and ZeRO-3 equals an uninterrupted one."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import launch_in_group, script_env
from hf_trainer_resume import deepspeed_on_cpu, zero_config
from test_hf import tiny_model  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import dataflex  # noqa: E402
from dataflex.backends.base import ensure_process_env  # noqa: E402
from dataflex.backends.deepspeed import DeepSpeedInterface  # noqa: E402
from dataflex.integrations.hf_trainer import DataFlexTrainer  # noqa: E402
from dataflex.selectors import GradNormSelector  # noqa: E402

import deepspeed  # noqa: E402
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]
deepspeed_on_cpu()

ZERO3 = zero_config(3)


@pytest.fixture(autouse=True)
def no_deepspeed_left_behind():
    """Trainer's DeepSpeed leaves process-wide state (transformers' ZeRO-3 flag, which makes the next model built
    in this process a ZeRO-3 partition; Accelerate's shared state; and Accelerate's ACCELERATE_USE_DEEPSPEED=true
    in os.environ, which makes every later TrainingArguments of this process a DeepSpeed one): cleared after each
    test."""
    before = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state()
    for k in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in before]:
        del os.environ[k]
    os.environ.update(before)


def train(folder: Path, domains, k: int, ds: dict | None = None):
    if ds is not None:
        ensure_process_env()          # what a launcher sets; a group of one
    model = tiny_model("llama", vocab=64, seed=4)
    flex = dataflex.DataFlex(domains, global_batch_size=8, seed=1, plugins=[GradNormSelector(keep_fraction=0.5)])
    args = TrainingArguments(output_dir=str(folder), max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="no", disable_tqdm=True, seed=0, gradient_accumulation_steps=k,
                             per_device_train_batch_size=8 // k, deepspeed=ds, **({} if ds else {"use_cpu": True}))
    trainer = DataFlexTrainer(model=model, args=args, flex=flex)
    trainer.train()
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    ledger = pd.read_parquet(folder / "ledger").sort_values(["step", "sample_id"]).reset_index(drop=True)
    return trainer, flex, lines, ledger


def full_params(trainer) -> dict:
    module = trainer.model_wrapped.module if hasattr(trainer.model_wrapped, "module") else trainer.model
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def one_at_a_time_norms(model, batch) -> torch.Tensor:
    """Each sample's own gradient (mean loss over its label tokens), by its own backward."""
    model.eval()
    out = []
    for i in range(len(batch["input_ids"])):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"][i:i + 1]).logits.float()
        token = torch.nn.functional.cross_entropy(logits[0], batch["labels"][i], reduction="none")
        mask = batch["loss_mask"][i].float()
        ((token * mask).sum() / mask.sum()).backward()
        out.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))
    model.zero_grad()
    return torch.stack(out).float()


@pytest.mark.parametrize("stage, k", [(3, 1), (3, 2), (1, 2), (2, 1)])
def test_zero_through_training_arguments_runs_ghost_norms(tmp_path, domains_builder, stage, k):
    domains = domains_builder(16)
    plain, plain_flex, plain_lines, plain_ledger = train(tmp_path / "plain", domains, k)
    ds, ds_flex, ds_lines, ds_ledger = train(tmp_path / "zero", domains, k, zero_config(stage))
    engine = ds.model_wrapped
    assert engine.zero_optimization_stage() == stage
    if stage == 3:
        assert any(p.numel() == 0 for p in engine.module.parameters())   # partitioned: the raw module is empty
    assert isinstance(ds_flex.interface, DeepSpeedInterface) and ds_flex.interface.engine is engine
    assert engine.train_micro_batch_size_per_gpu() == 8 // k and engine.gradient_accumulation_steps() == k
    # the same steps: losses, ghost norms (the selector's scores), the samples kept, the final weights
    assert len(ds_lines) == len(plain_lines) == 3
    for a, b in zip(plain_lines, ds_lines):
        for key in ("train_loss", "selector/candidate_grand_mean", "selector/kept_grand_mean"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert (plain_ledger.sample_id.values == ds_ledger.sample_id.values).all()
    trainer_loss = [h["loss"] for h in ds.state.log_history if "loss" in h]
    for a, b in zip(trainer_loss, [x["train_loss"] for x in ds_lines]):
        assert abs(a - b) < 1e-4                                         # Trainer's loss is dataflex's, unscaled
    final = full_params(ds)
    for n, p in plain.model.named_parameters():
        torch.testing.assert_close(final[n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
    # the norms through the engine, at the trained weights, against one backward per sample
    batch = ds_flex.data.batch(torch.arange(6))
    ghost = ds_flex.interface.per_sample_grad_norms(batch)
    torch.testing.assert_close(ghost, one_at_a_time_norms(plain.model, batch), rtol=1e-4, atol=1e-6)


def test_deepspeed_batch_sizes_are_dataflexs(tmp_path, domains_builder):
    """A per-device batch left at Trainer's default: DeepSpeed's "auto" sizes follow dataflex's global batch; a
    number in the DeepSpeed config that contradicts it is refused before the engine is built."""
    ensure_process_env()
    flex = dataflex.DataFlex(domains_builder(16), global_batch_size=4, seed=0)
    bad = {**ZERO3, "train_micro_batch_size_per_gpu": 8}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no", deepspeed=bad,
                             disable_tqdm=True)
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 contradicts dataflex's 4"):
        DataFlexTrainer(model=tiny_model("llama", vocab=64), args=args, flex=flex).train()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no", deepspeed=ZERO3,
                             disable_tqdm=True)
    trainer = DataFlexTrainer(model=tiny_model("llama", vocab=64), args=args, flex=flex)
    trainer.train()
    assert trainer.model_wrapped.train_micro_batch_size_per_gpu() == 4 == trainer.model_wrapped.train_batch_size()
    assert len(pd.read_parquet(tmp_path / "ledger")) == 4


@pytest.mark.slow
def test_zero3_on_two_ranks_equals_one_process(tmp_path):
    """Two torchrun ranks (gloo, CPU) under ZeRO-3 through TrainingArguments, the gradient-norm selector's ghost
    norms gathered over both: the losses, norms and samples of one process."""
    from dataflex.utils.dist import free_port

    env = script_env()
    script = str(Path(__file__).parent / "hf_trainer_ds_ranks.py")

    def launch(cmd):
        return launch_in_group(cmd, env, timeout=300)

    two = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                  script, str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 1 of 2: flex rank 1 of 2, zero stage 3" in two.stdout
    one = launch([sys.executable, script, str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    lines = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
             for k in ("one", "two")}
    assert len(lines["one"]) == len(lines["two"]) == 3
    for a, b in zip(lines["one"], lines["two"]):
        for key in ("train_loss", "selector/candidate_grand_mean", "selector/kept_grand_mean"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    la, lb = (pd.read_parquet(tmp_path / k / "ledger").sort_values(["step", "sample_id"]) for k in ("one", "two"))
    assert (la.sample_id.values == lb.sample_id.values).all() and {0, 1} <= set(lb["rank"])   # -1: not kept


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_under_zero_is_exact(tmp_path, domains_builder, stage):
    """tests/hf_trainer_resume.py's run (bandit, loss reweighter, loss selector) under Trainer's DeepSpeed: dead at
    step 5 after the checkpoint at step 3 (DeepSpeed's own checkpoint in it) and resumed in this process, its
    metrics lines, ledger and final weights equal an uninterrupted run's."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from hf_trainer_resume import assert_same_run, final_weights, run

    kw = dict(domains=domains_builder(16), zero=stage)
    trainer_a, model_a, _ = run(tmp_path / "a", **kw)
    weights_a = final_weights(trainer_a, model_a)
    unset_hf_deepspeed_config()        # the next model is built whole, as in a new process
    run(tmp_path / "b", crash_at=5, **kw)
    assert next((tmp_path / "b" / "checkpoint-3").glob("global_step*")).is_dir()      # DeepSpeed's checkpoint
    unset_hf_deepspeed_config()
    trainer_b, model_b, flex_b = run(tmp_path / "b", resume=True, **kw)
    assert flex_b.step == 6 and trainer_b.model_wrapped.zero_optimization_stage() == stage
    assert_same_run(tmp_path / "a", tmp_path / "b", weights_a, final_weights(trainer_b, model_b))


@pytest.mark.slow
def test_kill_9_under_zero3_then_resume_is_exact(tmp_path):
    """The same under ZeRO-3 with 4 micro-batches: SIGKILLed at step 5 and resumed by a new process, the run ends
    as an uninterrupted one, bit for bit (hf_trainer_resume.kill_then_resume)."""
    from hf_trainer_resume import kill_then_resume

    kill_then_resume(tmp_path, "--zero", "3", "--accumulation", "4")
