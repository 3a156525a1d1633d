"""TRL's SFTTrainer with dataflex: chat (`messages`) records as two domains, prepared by TRL (chat template,
assistant-only loss), drawn by the bandit mixer; prompt tokens carry weight 0 (the ledger's token counts are
the completion tokens, counted here from the answers' own tokens); each sample's loss equals the model's own
loss on TRL's labels; TRL's metrics in the logs; a resume from a checkpoint equals an uninterrupted run.
A tiny random Llama and a BPE tokenizer with a chat template made here: nothing is fetched."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import transformers
from test_hf import tiny_model, train_bpe  # noqa: E402
from hf_trainer_resume import crashed_and_resumed, train_or_crash  # noqa: E402

import datasets  # noqa: E402
from trl import SFTConfig  # noqa: E402  (required, in the hf extra: a broken install fails here, never skips)

from dataflex.core.loss import per_sample_loss  # noqa: E402
from dataflex.integrations.sft import DataFlexSFTTrainer, sft_samples  # noqa: E402
from dataflex.mixers import BanditMixer  # noqa: E402
from dataflex.reweighters import LossReweighter  # noqa: E402
from dataflex.utils.errors import DataConfigError  # noqa: E402

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
            "{{ m['content'] }}<|endoftext|>{% endgeneration %}{% else %}<|user|>{{ m['content'] }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    t = transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe(special=("<|endoftext|>", "<|user|>",
                                                                                 "<|assistant|>")),
                                             eos_token="<|endoftext|>")
    t.chat_template = TEMPLATE
    return t


def chats():
    math = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
            for a in range(3, 9) for b in (2, 11)]
    chat = [[{"role": "user", "content": f"Say something about the {w}."},
             {"role": "assistant", "content": f"The {w} is " + "very " * (i % 3) + "nice today."}]
            for i, w in enumerate(["sea", "sun", "rain", "city", "forest", "river", "road", "sky", "hill", "snow"])]
    return {"math": datasets.Dataset.from_dict({"messages": math}),
            "chat": datasets.Dataset.from_dict({"messages": chat})}


def answer_tokens(tok, data) -> dict:
    """{domain: [label tokens each record trains on]}: the assistant's answer alone, tokenized, plus its
    end-of-text (special tokens cut the text, so this is what it is inside the conversation)."""
    return {d: [len(tok(m[-1]["content"], add_special_tokens=False)["input_ids"]) + 1 for m in ds["messages"]]
            for d, ds in data.items()}


def sft_args(folder, **kw):
    base = dict(output_dir=str(folder), max_steps=4, learning_rate=1e-3, logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, max_length=64,
                assistant_only_loss=True, dataset_num_proc=None)
    return SFTConfig(**{**base, **kw})


def make(tok, folder, plugins, steps=4, eval_dataset=None, **kw):
    model = tiny_model("llama", vocab=len(tok), seed=1)
    return DataFlexSFTTrainer(model=model, args=sft_args(folder, max_steps=steps, **kw), processing_class=tok,
                              train_dataset=chats(), eval_dataset=eval_dataset,
                              flex=dict(global_batch_size=8, plugins=plugins, seed=3))


def test_sft_trainer_chat_domains_completion_only_with_bandit(tmp_path, tok):
    trainer = make(tok, tmp_path, [BanditMixer()])
    trainer.train()
    flex = trainer.flex
    assert flex.step == 4 and flex.data.names == ["math", "chat"]
    expected = answer_tokens(tok, chats())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ledger = pd.read_parquet(tmp_path / "ledger")
    assert [x["step"] for x in lines] == [0, 1, 2, 3]
    for line in lines:        # the ledger's token counts are the answers' tokens: prompt tokens weigh 0
        rows = ledger[ledger.step == line["step"]]
        d, local = flex.data.locate(torch.tensor(rows.sample_id.values))
        counts = {"math": 0, "chat": 0}
        for k, i in zip(d.tolist(), local.tolist()):
            name = flex.data.names[k]
            counts[name] += expected[name][i]
        assert line["tokens"] == sum(counts.values()) and line["domain_tokens"] == counts
    assert lines[0]["domain_weights"] != lines[-1]["domain_weights"]          # the bandit learned
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    for h, line in zip(logged, lines):     # TRL's metrics and dataflex's in the same logs
        assert {"entropy", "mean_token_accuracy", "num_tokens"} <= set(h)
        assert 0 < h["entropy"] <= torch.log(torch.tensor(float(len(tok)))).item() + 1e-4
        assert h["dataflex/train_loss"] == line["train_loss"] and "dataflex/bandit/reward_hat/math" in h
    # num_tokens: every input token of the drawn records (prompt included, padding not), TRL's count
    full = {d: [len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in ds["messages"]]
            for d, ds in chats().items()}
    d, local = flex.data.locate(torch.tensor(ledger.sample_id.values))
    assert logged[-1]["num_tokens"] == sum(full[flex.data.names[k]][i] for k, i in zip(d.tolist(), local.tolist()))


def test_samples_carry_trls_labels(tmp_path, tok):
    """Each sample's dataflex loss equals the model's own loss on TRL's labels for that record (the shift
    and the mask are TRL's), and its loss mask holds exactly the answer's tokens; `eval_dataset` as
    {domain: Dataset} is prepared by TRL the same way and evaluated per domain."""
    data = chats()
    trainer = make(tok, tmp_path, [], eval_dataset={d: ds.select(range(5)) for d, ds in data.items()})
    prepared = trainer._prepare_dataset(data["chat"], tok, trainer.args, False, None, "chat")
    samples = trainer.flex.data.sets[1]
    assert samples.loss_mask.sum(-1).tolist() == answer_tokens(tok, data)["chat"]
    model = trainer.model.eval()
    ids, labels, mask = samples.rows(torch.arange(len(samples)))
    ours = per_sample_loss(model(input_ids=ids).logits, labels, mask)
    owns = []
    for i, rec in enumerate(prepared):
        own = model(input_ids=torch.tensor([rec["input_ids"]]), labels=torch.tensor([rec["labels"]])).loss
        assert torch.allclose(ours[i], own, atol=1e-5), i
        owns.append(own.item())
    metrics = trainer.evaluate()          # the first 5 chat records: the mean of the model's own losses
    assert abs(metrics["eval_chat_loss"] - sum(owns[:5]) / 5) < 1e-4 and "eval_math_loss" in metrics
    # TRL's prompt-completion records: the completion alone is trained on
    pc = sft_samples([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]}], 6, 0)
    assert pc.loss_mask[0].tolist() == [False, False, True, True, False, False]
    assert pc.labels[0, :4].tolist() == [6, 7, 8, 9]


def test_resume_equals_an_uninterrupted_run(tmp_path, tok):
    def run(folder, crash=None, resume=None):
        trainer = make(tok, folder, [BanditMixer(), LossReweighter(burnout_steps=0)], steps=4,
                       save_strategy="steps", save_steps=2)
        return trainer if train_or_crash(trainer, crash, resume) else None

    crashed_and_resumed(run, tmp_path, crash_at=3, checkpoint=2, steps=4)


def test_refusals(tmp_path, tok):
    stream = datasets.Dataset.from_dict({"messages": chats()["math"]["messages"]}).to_iterable_dataset()
    with pytest.raises(DataConfigError, match="streaming=False"):
        DataFlexSFTTrainer(model=tiny_model("llama", vocab=len(tok)), args=sft_args(tmp_path), processing_class=tok,
                           train_dataset={"math": stream}, flex=dict(global_batch_size=8))
    with pytest.raises(ValueError, match="packing=True"):
        make(tok, tmp_path, [], packing=True)
