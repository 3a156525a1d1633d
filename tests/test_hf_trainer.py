"""HF Trainer with dataflex's data: the bandit mixer and the loss reweighter, ledger written."""
from __future__ import annotations

import json

import pandas as pd  # noqa: E402
import pytest
import torch
from test_hf import tiny_model  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import dataflex  # noqa: E402
from dataflex.integrations.hf_trainer import DataFlexTrainer, make_flex_trainer  # noqa: E402
from dataflex.mixers import BanditMixer  # noqa: E402
from dataflex.reweighters import LossReweighter  # noqa: E402


def args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=4, learning_rate=1e-3, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, **kw)


def test_trainer_with_bandit_mixer_and_loss_reweighter(tmp_path, domains_builder):
    model = tiny_model("llama", vocab=64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flex = dataflex.DataFlex(domains_builder(16), global_batch_size=8,
                             plugins=[BanditMixer(), LossReweighter(burnout_steps=0)], seed=0)
    trainer = DataFlexTrainer(model=model, args=args(tmp_path), flex=flex)
    result = trainer.train()
    assert result.global_step == 4 and flex.step == 4
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    ledger = pd.read_parquet(tmp_path / "ledger")
    assert sorted(ledger.step.unique()) == [0, 1, 2, 3] and len(ledger) == 32
    assert {"sample_id", "domain", "weight", "loss"} <= set(ledger.columns)
    assert ledger.weight.std() > 0                                  # the reweighter weighed the samples
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3] and all("bandit/reward_hat/A" in x for x in lines)
    assert lines[0]["domain_weights"] != lines[-1]["domain_weights"]   # the mixer learned
    logged = [h for h in trainer.state.log_history if "dataflex/train_loss" in h]
    assert logged and "dataflex/weight/A" in logged[0]
    assert (tmp_path / "samples.parquet").is_file() and (tmp_path / "summary.json").is_file()
    # Trainer's reported loss is dataflex's loss, unscaled
    assert abs(trainer.state.log_history[0]["loss"] - lines[0]["train_loss"]) < 0.2


def test_mixin_refuses_gradient_accumulation(tmp_path, domains_builder):
    flex = dataflex.DataFlex(domains_builder(16), global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        make_flex_trainer()(model=tiny_model("llama", vocab=64), args=args(tmp_path, gradient_accumulation_steps=2),
                            flex=flex)
