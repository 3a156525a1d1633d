"""HF Trainer with dataflex's data: the bandit mixer and the loss reweighter, ledger written; exact resume
from Trainer's checkpoints; gradient accumulation equal to one big batch; dataflex's validation sets as
`eval_dataset`; per-domain losses and plugin statistics in Trainer's logs."""
from __future__ import annotations

import json

import pandas as pd  # noqa: E402
import pytest
import torch
import hf_trainer_resume as resume_script
from hf_trainer_resume import assert_same_run, records, run
from conftest import launch_in_group, script_env
from test_hf import tiny_model  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import dataflex  # noqa: E402
from dataflex.integrations.hf_trainer import STATE_FILE, DataFlexTrainer, make_flex_trainer  # noqa: E402
from dataflex.mixers import BanditMixer, ShearedMixer  # noqa: E402
from dataflex.reweighters import LossReweighter  # noqa: E402
from dataflex.utils.safeload import load_weights_only  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, learning_rate=1e-3, logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def plugins():
    return [BanditMixer(), LossReweighter(burnout_steps=0)]


def test_trainer_with_bandit_mixer_and_loss_reweighter(tmp_path, domains_builder):
    model = tiny_model("llama", vocab=64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flex = dataflex.DataFlex(domains_builder(16), global_batch_size=8, plugins=plugins(), seed=0)
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
    assert len(logged) == 4
    for h, line in zip(logged, lines):     # Trainer's logs carry the step's record: weights, domain losses, plugins
        assert h["dataflex/train_loss"] == line["train_loss"]
        assert {f"dataflex/weight/{d}": w for d, w in line["domain_weights"].items()}.items() <= h.items()
        assert {f"dataflex/loss/{d}": x for d, x in line["domain_loss"].items()}.items() <= h.items()
        assert h["dataflex/bandit/reward_hat/A"] == line["bandit/reward_hat/A"]
    assert (tmp_path / "samples.parquet").is_file() and (tmp_path / "summary.json").is_file()
    # Trainer's reported loss is dataflex's (weighted) loss, unscaled
    assert abs(trainer.state.log_history[0]["loss"] - lines[0]["train_loss"]) < 0.2


# ------------------------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("accumulation, ignore_data_skip", [(1, False), (1, True), (4, False)])
def test_resume_from_checkpoint_is_exact(tmp_path, domains_builder, accumulation, ignore_data_skip):
    """Dead after the checkpoint at step 3 (by an exception at step 5, records of steps 3-4 left behind) and
    resumed in this process: the per-step losses, domain weights, ledger and final weights equal an uninterrupted
    run's. A real kill -9 of a separate process: test_kill_9_after_a_checkpoint_then_resume_is_exact."""
    domains = domains_builder(16)
    kw = dict(domains=domains, accumulation=accumulation, ignore_data_skip=ignore_data_skip)
    _, model_a, flex_a = run(tmp_path / "a", **kw)
    run(tmp_path / "b", crash_at=5, **kw)
    saved = load_weights_only(tmp_path / "b" / "checkpoint-3" / STATE_FILE)     # weights-only content
    assert saved["flex"]["step"] == 3 and saved["global_step"] == 3
    trainer_b, model_b, flex_b = run(tmp_path / "b", resume=True, **kw)
    assert flex_b.step == 6 == trainer_b.state.global_step
    assert_same_run(tmp_path / "a", tmp_path / "b", dict(model_a.named_parameters()), dict(model_b.named_parameters()))
    assert torch.equal(flex_a.sampler.weights, flex_b.sampler.weights)
    assert len([h["loss"] for h in trainer_b.state.log_history if "loss" in h]) == 6


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 4])
def test_kill_9_after_a_checkpoint_then_resume_is_exact(tmp_path, accumulation):
    """tests/hf_trainer_resume.py as a process of its own, SIGKILLed at the end of step 5 (after checkpoint-3) and
    resumed by a new process: its metrics lines, ledger and final weights equal an uninterrupted run's, bit for
    bit (hf_trainer_resume.kill_then_resume)."""
    resume_script.kill_then_resume(tmp_path, "--accumulation", str(accumulation))


def test_resume_refuses_a_checkpoint_without_dataflex_state(tmp_path, domains_builder):
    run(tmp_path, domains=domains_builder(16), crash_at=4)
    (tmp_path / "checkpoint-3" / STATE_FILE).unlink()
    with pytest.raises(Exception, match=STATE_FILE):
        run(tmp_path, domains=domains_builder(16), resume=True)


# ------------------------------------------------------------------------------------ gradient accumulation

@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, domains_builder, reduction):
    """4 micro-batches of 2 give the parameters, ledger and losses of one batch of 8 (same draws)."""
    out = {}
    for k in (1, 4):
        model = tiny_model("llama", vocab=64, seed=2)
        flex = dataflex.DataFlex(domains_builder(16), global_batch_size=8, plugins=plugins(), seed=0,
                                 loss_reduction=reduction)
        trainer = DataFlexTrainer(model=model, flex=flex, args=args(tmp_path / str(k), max_steps=3, learning_rate=1e-2,
                                                                    gradient_accumulation_steps=k,
                                                                    per_device_train_batch_size=8 // k))
        if reduction == "sample":      # transformers 4 then divides the loss by k: dataflex's share must survive it
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
        out[k] = (model, records(tmp_path / str(k)), trainer.state.log_history)
    (m1, (lines1, ledger1), logs1), (m4, (lines4, ledger4), logs4) = out[1], out[4]
    for (n, p), q in zip(m1.named_parameters(), m4.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    assert len(ledger4) == 24 and (ledger1.sample_id == ledger4.sample_id).all()
    torch.testing.assert_close(torch.tensor(ledger1.weight.values), torch.tensor(ledger4.weight.values), rtol=1e-4, atol=1e-6)
    for a, b in zip(lines1, lines4):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
    # Trainer's loss (the sum of the micro-batches' shares) is the one-batch loss
    for a, b in zip([h["loss"] for h in logs1 if "loss" in h], [h["loss"] for h in logs4 if "loss" in h]):
        assert abs(a - b) < 1e-4


def test_batch_arguments_agree_with_the_global_batch(tmp_path, domains_builder):
    flex = dataflex.DataFlex(domains_builder(16), global_batch_size=8, seed=0)
    trainer = make_flex_trainer()(model=tiny_model("llama", vocab=64), flex=flex,
                                  args=args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2))
    with pytest.raises(ValueError, match="per_device_train_batch_size=4"):
        trainer.train()
    trainer = make_flex_trainer()(model=tiny_model("llama", vocab=64), flex=flex,
                                  args=args(tmp_path, gradient_accumulation_steps=3))
    with pytest.raises(ValueError, match="does not split"):
        trainer.train()
    # left at Trainer's default, the per-device batch follows dataflex's global batch
    trainer = make_flex_trainer()(model=tiny_model("llama", vocab=64), flex=flex,
                                  args=args(tmp_path, gradient_accumulation_steps=2, max_steps=1))
    trainer.train()
    assert trainer._train_batch_size == 4 and len(pd.read_parquet(tmp_path / "ledger")) == 8


# ------------------------------------------------------------------------------------------------ evaluation

def test_eval_dataset_is_dataflexs_validation(tmp_path, domains_builder):
    """`eval_dataset=` dataflex's validation sets: Trainer's eval losses are DataFlex.evaluate's, per domain."""
    val = domains_builder(6, seed=1)
    model = tiny_model("llama", vocab=64)
    flex = dataflex.DataFlex(domains_builder(16), global_batch_size=8, seed=0)
    trainer = DataFlexTrainer(model=model, flex=flex, eval_dataset=val,
                              args=args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2))
    trainer.train()
    metrics = trainer.evaluate()
    # independent: the mean over label tokens of each sample, then over each domain's samples
    with torch.no_grad():
        for d, s in val.items():
            inputs, labels, mask = s.rows(torch.arange(len(s)))
            logits = model(input_ids=inputs).logits
            token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            per_sample = (token * mask).sum(-1) / mask.sum(-1)
            assert abs(metrics[f"eval_{d}_loss"] - float(per_sample.mean())) < 1e-5
    assert abs(metrics["eval_loss"] - sum(metrics[f"eval_{d}_loss"] for d in val) / 3) < 1e-9
    logged = [h for h in trainer.state.log_history if "eval_A_loss" in h]
    assert [h["step"] for h in logged] == [2, 2]        # the evaluation at step 2, and the one above


def test_sheared_learns_at_trainer_evaluations(tmp_path, domains_builder):
    """Sheared's weights under Trainer (evaluations every 2 steps) equal a hand-written loop's that calls
    flex.evaluate at the same steps."""
    val = domains_builder(6, seed=1)
    reference = {"A": 0.5, "B": 3.0, "C": 1.0}

    def session():
        return dataflex.DataFlex(domains_builder(16), global_batch_size=8, seed=0,
                                 plugins=[ShearedMixer(reference_loss=reference)])

    model = tiny_model("llama", vocab=64)
    flex = session()
    trainer = DataFlexTrainer(model=model, flex=flex, eval_dataset=val, lean_loss=False,
                              args=args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2,
                                        optim="sgd", learning_rate=1e-2, max_grad_norm=0, lr_scheduler_type="constant"))
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    model = tiny_model("llama", vocab=64)
    own = session()
    own.interface = dataflex.TorchInterface(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    weights = []
    for step in range(4):
        batch = own.next_batch()
        own.loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits, batch).backward()
        opt.step()
        opt.zero_grad()
        weights.append(own.end_step()["domain_weights"])
        if step % 2 == 1:
            own.evaluate(dataflex.MixtureDataset(val))
    assert lines[2]["domain_weights"] != lines[0]["domain_weights"]      # learned at the evaluation after step 2
    for line, w in zip(lines, weights):
        for d in w:
            assert abs(line["domain_weights"][d] - w[d]) < 1e-5
    assert torch.allclose(flex.sampler.weights, own.sampler.weights, atol=1e-5)


# ------------------------------------------------------------------------------------------------ two ranks

def test_two_ranks_under_torchrun_equal_one_process(tmp_path):
    """DataFlex built before TrainingArguments (the README's order): under torchrun each rank still learns its
    rank when training starts, and 2 ranks (gloo, CPU) train what 1 process trains."""
    import sys
    from pathlib import Path

    from dataflex.utils.dist import free_port

    env = script_env()
    script = str(Path(__file__).parent / "hf_trainer_ranks.py")

    def launch(cmd):
        return launch_in_group(cmd, env, timeout=120)

    two = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                  script, str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 1 of 2: flex rank 1 of 2" in two.stdout and "rank 0 of 2: flex rank 0 of 2" in two.stdout
    one = launch([sys.executable, script, str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = torch.load(tmp_path / "one" / "params.pt"), torch.load(tmp_path / "two" / "params.pt")
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5, msg=n)
    la, lb = pd.read_parquet(tmp_path / "one" / "ledger"), pd.read_parquet(tmp_path / "two" / "ledger")
    assert (la.sample_id.values == lb.sample_id.values).all() and set(lb["rank"]) == {0, 1}
    torch.testing.assert_close(torch.tensor(la.weight.values), torch.tensor(lb.weight.values), rtol=1e-4, atol=1e-6)


def test_a_reloaded_adapter_in_inference_mode_is_named(tmp_path):
    """PeftModel.from_pretrained loads adapters frozen: DataFlexTrainer says to load them with is_trainable=True
    (or to score them by name with params="lora"), and per-sample signals over "trainable" say the same; the
    adapters scored by name work as they are."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from test_hf import tiny_model

    from conftest import synthetic_domains

    from dataflex.grad.interface import TorchInterface
    from dataflex.utils.errors import UserError

    get_peft_model(tiny_model("llama", vocab=64, seed=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])) \
        .save_pretrained(tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(tiny_model("llama", vocab=64, seed=2), tmp_path / "adapter")
    assert not any(p.requires_grad for p in frozen.parameters())
    flex = dataflex.DataFlex(synthetic_domains(16), global_batch_size=8, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True,
                             per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True)
    with pytest.raises(UserError, match=r"is_trainable=True.*params=\"lora\""):
        DataFlexTrainer(model=frozen, args=args, flex=flex)
    batch = flex.data.batch(torch.arange(4))
    with pytest.raises(ValueError, match="is_trainable=True"):
        TorchInterface(frozen).per_sample_grad_norms(batch, params="trainable")
    norms = TorchInterface(frozen).per_sample_grad_norms(batch, params="lora")
    assert norms.shape == (4,) and bool((norms > 0).all())
    trainable = PeftModel.from_pretrained(tiny_model("llama", vocab=64, seed=2), tmp_path / "adapter",
                                          is_trainable=True)
    DataFlexTrainer(model=trainable, args=args, flex=flex)      # accepted
