"""TRL's DPOTrainer with dataflex: preference pairs (a JSONL file and a `datasets.Dataset`) as two domains,
prepared, collated and scored by TRL, drawn by the bandit mixer and weighed pair by pair; each pair's loss is
checked against a DPO loss computed here from the model's own log-probabilities, the unweighted mean against
plain TRL's loss on the same batch, the weighted loss against sum_i w_i l_i / sum_i w_i; a resume from a
checkpoint equals an uninterrupted run. A tiny random Llama and a BPE tokenizer made here: nothing is fetched."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers
from test_hf import tiny_model, train_bpe  # noqa: E402
from hf_trainer_resume import crashed_and_resumed, train_or_crash  # noqa: E402

import datasets  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402  (required, in the hf extra: a broken install fails here)

from dataflex.integrations.dpo import DataFlexDPOTrainer  # noqa: E402
from dataflex.mixers import AioliMixer, BanditMixer  # noqa: E402
from dataflex.reweighters import FocalReweighter, LossReweighter  # noqa: E402
from dataflex.selectors import LossSelector  # noqa: E402
from dataflex.utils.errors import UserError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BETA = 0.5


@pytest.fixture(scope="module")
def tok():
    return transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe(), eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{"math": a JSONL file, "chat": a Dataset}: explicit prompts, plain text."""
    math = [{"prompt": f"What is {a} plus {b}?", "chosen": f" {a + b}.", "rejected": f" {a * b + 1} or so."}
            for a in range(3, 9) for b in (2, 11)]
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math))
    words = ["sea", "sun", "rain", "city", "forest", "river", "road", "sky", "hill", "snow"]
    chat = {"prompt": [f"Say something about the {w}." for w in words],
            "chosen": [f" The {w} is " + "very " * (i % 3) + "nice today." for i, w in enumerate(words)],
            "rejected": [f" {w}" for w in words]}
    return {"math": str(folder / "math.jsonl"), "chat": datasets.Dataset.from_dict(chat)}


def dpo_args(folder, **kw):
    base = dict(output_dir=str(folder), max_steps=4, learning_rate=1e-3, logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, max_length=48, beta=BETA,
                dataset_num_proc=None, bf16=False)    # float32: TRL's default bf16 moves losses by ~5e-2 with padding
    return DPOConfig(**{**base, **kw})


def make(tok, folder, pairs, plugins, steps=4, eval_dataset=None, **kw):
    model = tiny_model("llama", vocab=len(tok), seed=1)
    ref = tiny_model("llama", vocab=len(tok), seed=2).eval()     # another model: pair losses differ at once
    return DataFlexDPOTrainer(model=model, ref_model=ref, args=dpo_args(folder, max_steps=steps, **kw),
                              processing_class=tok, train_dataset=pairs, eval_dataset=eval_dataset,
                              flex=dict(global_batch_size=8, plugins=plugins, seed=3))


def logps(model, batch) -> torch.Tensor:
    """Sum of the completion tokens' log-probabilities of each row, from the model's logits (no TRL code)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    lp = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (lp * batch["completion_mask"][:, 1:]).sum(-1)


def dpo_by_hand(model, ref, batch) -> torch.Tensor:
    """The sigmoid DPO loss of each pair: -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)))."""
    pi, rf = logps(model, batch), logps(ref, batch)
    n = len(pi) // 2
    return -F.logsigmoid(BETA * ((pi[:n] - rf[:n]) - (pi[n:] - rf[n:])))


def test_dpo_two_domains_bandit_and_loss_reweighter(tmp_path, tok, pairs):
    trainer = make(tok, tmp_path, pairs, [BanditMixer(), LossReweighter(burnout_steps=0)])
    trainer.train()
    flex = trainer.flex
    assert flex.step == 4 and flex.data.names == ["math", "chat"] and flex.data.sizes == [12, 10]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ledger = pd.read_parquet(tmp_path / "ledger")
    assert [x["step"] for x in lines] == [0, 1, 2, 3]
    assert len(ledger) == 4 * 8 and (ledger.groupby("step").size() == 8).all()      # one row per pair
    assert ledger.loss.notna().all() and (ledger.loss > 0).all()
    assert (ledger.groupby("step").weight.mean() - 1).abs().max() < 1e-9            # mean-1 weights
    assert ledger.weight.std() > 0                                                 # the reweighter weighed
    assert lines[0]["domain_weights"] != lines[-1]["domain_weights"]              # the bandit learned
    for line in lines:       # the step's loss is the mean pair loss of its ledger rows (sample reduction)
        assert abs(line["train_loss"] - ledger[ledger.step == line["step"]].loss.mean()) < 1e-6
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    for h, line in zip(logged, lines):       # TRL's metrics and dataflex's in the same logs
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "num_tokens"} <= set(h)
        assert h["dataflex/train_loss"] == line["train_loss"] and "dataflex/bandit/reward_hat/math" in h


def test_pair_losses_are_trls_and_the_weighted_mean_is_exact(tmp_path, tok, pairs):
    """One step by hand. (b) Each pair's loss equals the sigmoid DPO loss computed here from the policy's and
    the reference's log-probabilities, and their plain mean equals plain TRL DPOTrainer's loss on the same
    collated batch. (c) With LossReweighter's weights, the loss returned (and its gradient) is
    sum_i w_i l_i / sum_i w_i over those hand-computed losses, with w the ledger's weights."""
    trainer = make(tok, tmp_path / "flex", pairs, [BanditMixer(), LossReweighter(burnout_steps=0)])
    model, ref = trainer.model.train(), trainer.ref_model
    inputs = next(iter(trainer.get_train_dataloader()))
    ids = inputs["flex_ids"]
    batch = {k: v for k, v in inputs.items() if k not in ("flex_ids", "flex_micro")}
    assert len(batch["input_ids"]) == 2 * len(ids) == 16           # TRL's collation: 8 chosen, then 8 rejected
    hand = dpo_by_hand(model, ref, batch)
    _, per_pair, mean = trainer._flex_pair_losses(model, dict(batch))
    assert torch.allclose(per_pair, hand, atol=1e-5) and hand.std() > 0

    plain_model = tiny_model("llama", vocab=len(tok), seed=1).train()        # the same weights, plain TRL
    plain_ref = tiny_model("llama", vocab=len(tok), seed=2).eval()
    plain = DPOTrainer(model=plain_model, ref_model=plain_ref, args=dpo_args(tmp_path / "plain"), processing_class=tok,
                       train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}]))
    trl_loss = plain.compute_loss(plain_model, dict(batch))
    assert abs(float(trl_loss) - float(per_pair.mean())) < 1e-5 and abs(float(trl_loss) - float(mean)) < 1e-5

    model.zero_grad()
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    record = trainer.flex.end_step()
    rows = pd.DataFrame(record["ledger"])
    assert rows.sample_id.tolist() == ids.tolist()
    w = torch.tensor(rows.weight.values, dtype=torch.float32)
    assert w.std() > 0.01                                               # the pairs are weighed differently
    assert torch.allclose(torch.tensor(rows.loss.values, dtype=torch.float32), hand.detach(), atol=1e-5)
    model.zero_grad()
    expected = (w * dpo_by_hand(model, ref, batch)).sum() / w.sum()
    expected.backward()
    assert abs(float(loss) - float(expected)) < 1e-5
    for g, p in zip(ours, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)


def test_precomputed_reference_and_trls_evaluation(tmp_path, tok, pairs):
    """TRL's precomputed reference log-probs (computed per domain, carried by the collated pairs) give the same
    pair losses as the reference forward (to float32 noise: the precomputation pads each pair with other pairs,
    about 1e-5 of a sequence's log-probability); `eval_dataset` is TRL's, evaluated by TRL (its reward metrics)."""
    runs = {}
    for pre in (False, True):
        trainer = make(tok, tmp_path / str(pre), pairs, [BanditMixer()], steps=2, precompute_ref_log_probs=pre,
                       eval_dataset={"math": datasets.Dataset.from_list(
                           [{"prompt": "What is 2 plus 2?", "chosen": " 4.", "rejected": " 5 or so."}] * 3)})
        trainer.train()
        runs[pre] = (pd.read_parquet(tmp_path / str(pre) / "ledger"), trainer.evaluate())
    (a, eval_a), (b, eval_b) = runs[False], runs[True]
    assert a.sample_id.tolist() == b.sample_id.tolist()
    assert a.loss.values == pytest.approx(b.loss.values, abs=1e-3)
    assert eval_a["eval_math_loss"] == pytest.approx(eval_b["eval_math_loss"], abs=1e-3)
    assert {"eval_rewards/margins", "eval_rewards/accuracies"} <= set(eval_a)


def test_refusals(tmp_path, tok, pairs):
    with pytest.raises(UserError, match="one margin per pair"):
        make(tok, tmp_path, pairs, [FocalReweighter()])
    with pytest.raises(UserError, match="validation probes"):
        make(tok, tmp_path, pairs, [AioliMixer()])
    with pytest.raises(UserError, match="selector"):
        make(tok, tmp_path, pairs, [LossSelector()])
    with pytest.raises(ValueError, match="sorts the batch's pairs"):
        make(tok, tmp_path, pairs, [], loss_type=["aot"])
    with pytest.raises(ValueError, match="loss_reduction"):
        DataFlexDPOTrainer(model=tiny_model("llama", vocab=len(tok)), args=dpo_args(tmp_path), processing_class=tok,
                           train_dataset=pairs, flex=dict(global_batch_size=8, loss_reduction="token"))


def test_resume_and_accumulation_equal_an_uninterrupted_run(tmp_path, tok, pairs):
    """Killed after the checkpoint at step 2 and resumed: the records and the weights equal an uninterrupted
    run's; two micro-batches a step (weighed once over the whole batch) give the same records."""
    def run(folder, crash=None, resume=None, **kw):
        trainer = make(tok, folder, pairs, [BanditMixer(), LossReweighter(burnout_steps=0)], steps=4,
                       save_strategy="steps", save_steps=2, **kw)
        return trainer if train_or_crash(trainer, crash, resume) else None

    crashed_and_resumed(run, tmp_path, crash_at=3, checkpoint=2, steps=4)
    # plain SGD here: Adam's first steps (about lr x sign(g)) blow float noise in tiny gradients up. The first
    # step is the same batch forwarded in other shapes (each micro-batch padded to its own longest pair): equal
    # to float noise; later steps carry that noise on, amplified by the steps
    one = run(tmp_path / "one", optim="sgd", learning_rate=0.05)
    two = run(tmp_path / "two", optim="sgd", learning_rate=0.05, gradient_accumulation_steps=2)
    l1, l2 = ([json.loads(x) for x in (tmp_path / f / "metrics.jsonl").read_text().splitlines()]
              for f in ("one", "two"))
    for x, y in zip(l1, l2):
        tol = 1e-5 if x["step"] == 0 else 1e-3
        assert x["domain_weights"] == pytest.approx(y["domain_weights"], rel=tol)
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=tol)
    r1, r2 = (pd.read_parquet(tmp_path / f / "ledger") for f in ("one", "two"))
    assert r1.sample_id.tolist() == r2.sample_id.tolist() and r1.weight.std() > 0.1
    first = r1.step.values == 0
    assert r1.weight.values[first] == pytest.approx(r2.weight.values[first], rel=1e-4)   # exp(loss) amplifies
    assert r1.loss.values[first] == pytest.approx(r2.loss.values[first], rel=1e-5)
    assert r1.weight.values == pytest.approx(r2.weight.values, rel=1e-2)
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        assert torch.allclose(p, q, atol=1e-4)


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(tmp_path):
    """2 ranks (gloo, CPU) train what 1 process trains: the pairs' losses are gathered before the reweighter
    weighs them, and each rank's loss is its pairs' weighted sum over the global weight total."""
    import sys
    from pathlib import Path

    from conftest import launch_in_group, script_env

    from dataflex.utils.dist import free_port

    env, script = script_env(), str(Path(__file__).parent / "trl_dpo_ranks.py")
    two = launch_in_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", script, str(tmp_path / "two")], env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 1 of 2: flex rank 1 of 2" in two.stdout
    one = launch_in_group([sys.executable, script, str(tmp_path / "one")], env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = torch.load(tmp_path / "one" / "params.pt"), torch.load(tmp_path / "two" / "params.pt")
    la, lb = pd.read_parquet(tmp_path / "one" / "ledger"), pd.read_parquet(tmp_path / "two" / "ledger")
    assert la.sample_id.tolist() == lb.sample_id.tolist() and set(lb["rank"]) == {0, 1} and la.weight.std() > 0.1
    first = la.step.values == 0       # the same pairs forwarded in other batch shapes: equal to float noise, which
    assert la.weight.values[first] == pytest.approx(lb.weight.values[first], rel=1e-4)    # later steps carry on
    assert la.loss.values[first] == pytest.approx(lb.loss.values[first], rel=1e-5)
    assert la.weight.values == pytest.approx(lb.weight.values, rel=1e-2)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-3, atol=1e-4, msg=n)
