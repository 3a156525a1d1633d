"""Supervised records in data configs (`records: prompt-completion | chat`): the loss on completions and
assistant turns only, through the memory-mapped token cache. Checked against the answers' own tokens
(tokenized alone: special tokens cut the text, so that is what they are inside the conversation), against
`dataset_domain`'s in-memory prompt/completion samples, across chunk boundaries, in saved dataset folders,
and in a DataFlex step's token counts. A streaming dataset given as a domain is refused, saying what to do."""
from __future__ import annotations

import json

import datasets
import pytest
import torch
import transformers
from test_hf import train_bpe

import dataflex
from dataflex.data.domains import dataset_domain, load_domains
from dataflex.utils.errors import DataConfigError

MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
          "{{ m['content'] }}<|endoftext|>{% endgeneration %}{% else %}<|user|>{{ m['content'] }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
PLAIN = MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
QA = [(f"What is {a} plus {b}?", f"It is {a + b}, I think.") for a in range(4) for b in range(3)]


def tokenizer_folder(folder, template):
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(special=("<|endoftext|>", "<|user|>", "<|assistant|>")), eos_token="<|endoftext|>")
    tok.chat_template = template
    tok.save_pretrained(folder)
    return tok


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def trained(samples, i):
    """The labels sample i trains on."""
    _, labels, mask = samples.rows([i])
    return labels[0][mask[0]].tolist()


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok_marked")
    return folder, tokenizer_folder(folder, MARKED)


def answer(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_prompt_completion_strings(tmp_path, marked):
    folder, tok = marked
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": q, "completion": " " + a} for q, a in QA])
    cfg = {"domains": {"qa": {"train": path, "records": "prompt-completion"}}, "tokenizer": str(folder),
           "cache": str(tmp_path / "cache")}
    s = load_domains(cfg, 32).train["qa"]
    assert len(s) == len(QA)
    for i, (q, a) in enumerate(QA):
        assert trained(s, i) == answer(tok, " " + a)                      # prompt tokens weigh 0
        prompt = tok(q, add_special_tokens=False)["input_ids"]
        assert not s.rows([i])[2][0, :len(prompt) - 1].any()
    # the same samples as dataset_domain's in-memory prompt/completion records
    mem = dataset_domain(datasets.Dataset.from_dict({"prompt": [q for q, _ in QA],
                                                     "completion": [" " + a for _, a in QA]}), 32,
                         load_domains(cfg, 32).tokenizer)
    for x, y in zip(s.rows(torch.arange(len(s))), mem.rows(torch.arange(len(mem)))):
        assert torch.equal(x, y)
    # chunks: a record longer than seq_len is cut like a document; the trained labels stay the completion's
    short = load_domains(cfg, 6).train["qa"]
    got = {}
    for i in range(len(short)):
        got.setdefault(short.documents([i])[0], []).extend(trained(short, i))
    assert [got[d] for d in sorted(got)] == [answer(tok, " " + a) for _, a in QA]


def test_chat_records_with_and_without_generation_markers(tmp_path, marked):
    folder, tok = marked
    two_turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": a},
                  {"role": "user", "content": "And twice that?"}, {"role": "assistant", "content": "Twice: " + a}]
                 for q, a in QA]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in two_turns])
    cfg = {"domains": {"chat": {"train": path, "records": "chat"}}, "tokenizer": str(folder),
           "cache": str(tmp_path / "cache")}
    s = load_domains(cfg, 128).train["chat"]
    for i, (_, a) in enumerate(QA):          # marked template: both assistant turns are trained, nothing else
        assert trained(s, i) == answer(tok, a) + answer(tok, "Twice: " + a)
    plain = tmp_path / "tok_plain"
    tokenizer_folder(plain, PLAIN)
    cfg["tokenizer"] = str(plain)            # no markers: the last assistant message alone
    s = load_domains(cfg, 128).train["chat"]
    for i, (_, a) in enumerate(QA):
        assert trained(s, i) == answer(tok, "Twice: " + a)
    one_turn = [{"messages": [{"role": "user", "content": "hi"}]}]
    cfg["domains"]["chat"]["train"] = write_jsonl(tmp_path / "bad.jsonl", one_turn)
    with pytest.raises(DataConfigError, match="bad.jsonl:1: the last message is not the assistant's"):
        load_domains(cfg, 128)


def test_saved_dataset_folder_with_split_and_column_and_a_flex_step(tmp_path, marked):
    folder, tok = marked
    convo = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"conv": convo}),
                          "test": datasets.Dataset.from_dict({"conv": convo[:4]})}).save_to_disk(str(tmp_path / "dd"))
    cfg = {"domains": {"chat": {"train": str(tmp_path / "dd"), "val": str(tmp_path / "dd"), "records": "chat",
                                "column": "conv", "split": {"val": "test"}},
                       "text": {"train": write_jsonl(tmp_path / "t.jsonl", [{"text": a * 3} for _, a in QA])}},
           "tokenizer": str(folder), "cache": str(tmp_path / "cache")}
    domains = load_domains(cfg, 64)
    assert len(domains.val["chat"]) == 4 and len(domains.train["chat"]) == len(QA)
    flex = dataflex.DataFlex(domains.train, global_batch_size=6, seed=0)
    batch = flex.next_batch()
    V = tok.backend_tokenizer.get_vocab_size()
    flex.loss(torch.randn(*batch["input_ids"].shape, V, requires_grad=True), batch).backward()
    record = flex.end_step()
    d, local = flex.data.locate(batch["sample_id"])
    chat = flex.data.names.index("chat")
    want = sum(len(answer(tok, QA[i][1])) for k, i in zip(d.tolist(), local.tolist()) if k == chat)
    assert record["domain_tokens"]["chat"] == want                     # the ledger counts completion tokens
    with pytest.raises(DataConfigError, match="records: 'dialogue'"):
        load_domains({**cfg, "domains": {"chat": {**cfg["domains"]["chat"], "records": "dialogue"}}}, 64)


def test_messages_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataConfigError, match="chat template"):      # the embedded tokenizers file has none
        load_domains({"domains": {"c": {"train": path, "records": "chat"}}, "cache": str(tmp_path / "cache")}, 16)


def test_a_streaming_dataset_as_a_domain_is_refused_saying_what_to_do():
    stream = datasets.Dataset.from_dict({"text": ["a b c"] * 4}).to_iterable_dataset()
    with pytest.raises(DataConfigError, match=r"streaming=False.*save_to_disk"):
        dataflex.DataFlex({"web": stream}, global_batch_size=2)
    with pytest.raises(DataConfigError, match="streaming=False"):
        dataset_domain(stream, 16)
    with pytest.raises(DataConfigError, match="dataset_domain"):       # a Dataset object: how to make it samples
        dataflex.DataFlex({"web": datasets.Dataset.from_dict({"text": ["a b c"] * 4})}, global_batch_size=2)


def test_dataset_domain_messages_in_python(marked):
    from dataprep.tokenizer import load_tokenizer

    folder, tok = marked
    convo = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    s = dataset_domain(datasets.Dataset.from_dict({"messages": convo}), 64, load_tokenizer(folder))
    assert len(s) == len(QA)
    for i, (_, a) in enumerate(QA):
        assert trained(s, i) == answer(tok, a)
