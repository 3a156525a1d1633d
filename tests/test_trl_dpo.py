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
from test_hf_trainer import train_or_crash  # noqa: E402

import datasets  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402  (required, in the hf extra: a broken install fails here)

from dataflex.integrations.dpo import DataFlexDPOTrainer  # noqa: E402
from dataflex.integrations.hf_trainer import STATE_FILE  # noqa: E402
from dataflex.mixers import BanditMixer  # noqa: E402
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
                dataset_num_proc=None)
    return DPOConfig(**{**base, **kw})


def make(tok, folder, pairs, plugins, steps=4, ref_seed=2, **kw):
    model = tiny_model("llama", vocab=len(tok), seed=1)
    ref = tiny_model("llama", vocab=len(tok), seed=ref_seed).eval()     # another model: pair losses differ at once
    return DataFlexDPOTrainer(model=model, ref_model=ref, args=dpo_args(folder, max_steps=steps, **kw),
                              processing_class=tok, train_dataset=pairs,
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
