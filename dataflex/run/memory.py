"""A memory estimate before the first step: a run that cannot fit is refused at once, naming what to change.

    est = estimate(shape, seq_len=128, micro_batch=16, packing=True, lean=True, zero_stage=0, dp_world=1,
                   bf16=False, device="cpu")
    verdict(est, available_bytes("cpu"), ...)   # None, or ("warn" | "refuse", message)

What one rank holds at its peak (a forward and backward of its micro-batch, then the optimizer step):

- weights (4 bytes a parameter; bf16: 2, plus DeepSpeed's fp32 master copy of the trainable ones);
- gradients (as the weights) and AdamW's two moments (8 bytes a trainable parameter); ZeRO 1 splits the
  optimizer state over the data-parallel ranks, ZeRO 2 the gradients too, ZeRO 3 the weights too;
- activations: per token and layer `ACT_PER_HIDDEN` bytes per hidden unit (TinyGPT's saved tensors: the
  block's inputs, q/k/v, attention output, the 4x MLP's two sides; HF Llama-like: `10 H + 4 I` values), plus
  the attention's `T x T` terms (`ATTN_T2_CPU` bytes per micro-batch row, layer and T^2 on CPU, where SDPA with
  a mask materialises them; the packing mask alone on CUDA);
- the loss: the lean loss's chunk buffer (`dataflex/core/lean_loss.py`: 64 MiB on CPU, 256 MiB on CUDA), or
  with `trainer.lean_loss=false` the full logits, `LOGITS_COPIES` x tokens x V x 4 bytes (the logits, their
  float32 log-softmax and its gradient).

The constants are measured on TinyGPT on CPU (tests/test_memory_estimate.py compares the estimate with the
peak resident memory of a forward, backward and AdamW step: 0.99x and 1.02x of it for the two shapes there,
the test allowing 0.75x to 2x). The CUDA terms (no T x T scores: SDPA's memory-efficient kernel) are reasoned,
not measured. It leaves out what a plugin adds (per-sample gradients, probes) and the data (memory-mapped).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GiB = 2 ** 30
ACT_PER_HIDDEN = 68          # bytes a token, layer and hidden unit in float32 (TinyGPT: 17 saved values)
ATTN_T2_CPU = 5              # bytes a row, layer and T^2 on CPU (SDPA with a mask; measured)
LOGITS_COPIES = 4            # [tokens, V] float32 tensors alive at once on the logits path
LEAN_CHUNK = {"cpu": 64 << 20, "cuda": 256 << 20}
PROCESS_OVERHEAD = GiB // 2  # a new rank process on CPU: Python, torch, DeepSpeed, the tokenizer
WARN_AT, REFUSE_AT = 0.8, 1.0


@dataclass
class Shape:
    """What the estimate needs to know of a model."""
    kind: str                 # "tinygpt" | "hf"
    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int                  # the MLP's inner width
    params: int
    trainable: int
    dtype_bytes: int = 4
    checkpointing: bool = False


def tinygpt_shape(vocab: int, seq_len: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                  lora_rank: int = 0) -> Shape:
    """TinyGPT's parameters counted from its layers (dataflex/models/tiny_gpt.py)."""
    H = d_model
    block = 4 * (H * H + H) + 2 * 2 * H + (H * 4 * H + 4 * H) + (4 * H * H + H)
    block += 4 * 2 * H * lora_rank
    params = vocab * H + seq_len * H + n_layers * block + 2 * H + vocab * H
    return Shape("tinygpt", vocab, H, n_layers, n_heads, 4 * H, params, params)


def hf_shape(config: dict, vocab: Optional[int] = None, dtype: str = "float32", lora_r: int = 0,
             checkpointing: bool = False) -> Shape:
    """A Llama-like HF model from its config.json (hidden_size, num_hidden_layers, intermediate_size,
    num_attention_heads, num_key_value_heads; GPT-2's n_embd / n_layer / n_head too)."""
    H = int(config.get("hidden_size") or config.get("n_embd") or config.get("d_model"))
    L = int(config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers"))
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    ffn = int(config.get("intermediate_size") or config.get("n_inner") or 4 * H)
    kv = int(config.get("num_key_value_heads") or heads)
    V = int(vocab or config.get("vocab_size"))
    head_dim = int(config.get("head_dim") or H // heads)
    attn = H * heads * head_dim * 2 + H * kv * head_dim * 2
    mlp = 3 * H * ffn if "intermediate_size" in config else 2 * H * ffn
    tied = bool(config.get("tie_word_embeddings", True))
    params = V * H * (1 if tied else 2) + L * (attn + mlp + 2 * H) + H + int(config.get("n_positions") or 0) * H
    trainable = params if not lora_r else L * 2 * 2 * H * lora_r     # peft's default: q and v projections
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(dtype), 4)
    return Shape("hf", V, H, L, heads, ffn, params, trainable, width, checkpointing)


@dataclass
class Estimate:
    weights: int
    grads: int
    optimizer: int
    activations: int
    loss: int
    ranks_here: int = 1       # ranks sharing this memory (CPU: every rank of the machine; CUDA: one a device)
    overhead: int = 0         # new processes' own memory

    @property
    def per_rank(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.loss

    @property
    def total(self) -> int:
        return self.per_rank * self.ranks_here + self.overhead

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in (("weights", self.weights), ("gradients", self.grads),
                          ("optimizer", self.optimizer), ("activations", self.activations), ("loss", self.loss)))
        per = f" per rank, x{self.ranks_here} ranks" if self.ranks_here > 1 else ""
        return f"{gib(self.total)} ({parts} GiB{per})"


def gib(n: float) -> str:
    return f"{n / GiB:,.1f} GiB"


def estimate(shape: Shape, seq_len: int, micro_batch: int, *, packing: bool = True, lean: bool = True,
             zero_stage: int = 0, dp_world: int = 1, bf16: bool = False, device: str = "cpu",
             ranks_here: int = 1, new_processes: int = 0) -> Estimate:
    """Bytes one rank needs at its peak (see the module docstring); `ranks_here` ranks share the memory."""
    P, Tr = shape.params, shape.trainable
    w = 2 if bf16 else shape.dtype_bytes
    weights = P * w + (Tr * 4 if w < 4 else 0)                    # bf16: DeepSpeed's fp32 master copy
    grads = Tr * w + (Tr * 4 if w < 4 else 0)
    optimizer = Tr * 8
    if zero_stage >= 1:
        optimizer //= dp_world
    if zero_stage >= 2:
        grads //= dp_world
    if zero_stage >= 3:
        weights //= dp_world
    tokens = seq_len * micro_batch
    if shape.kind == "hf":
        per_layer = tokens * (10 * shape.hidden + 4 * shape.ffn) * w
    else:
        per_layer = int(tokens * shape.hidden * ACT_PER_HIDDEN * w / 4)     # the constant is float32 bytes
    if shape.checkpointing:         # each layer's input kept, one layer's activations live in its backward
        activations = tokens * shape.hidden * w * shape.layers + per_layer
    else:
        activations = per_layer * shape.layers
    t2 = micro_batch * seq_len * seq_len
    if device == "cpu":
        activations += ATTN_T2_CPU * t2 * (1 if shape.checkpointing else shape.layers)
    if packing:
        activations += t2 * (1 if shape.kind == "tinygpt" else w)   # the [B, 1, T, T] mask (HF: in its dtype)
    if lean:
        loss = LEAN_CHUNK.get(device, LEAN_CHUNK["cuda"]) * (1 if w == 4 else 2)
    else:
        loss = LOGITS_COPIES * tokens * shape.vocab * 4
    return Estimate(weights, grads, optimizer, activations, loss, ranks_here, new_processes * PROCESS_OVERHEAD
                    if device == "cpu" else 0)


def available_bytes(device: str = "cpu", index: int = 0) -> Optional[int]:
    """Memory a run may still take: CPU, /proc/meminfo's MemAvailable (psutil elsewhere); CUDA, the free
    memory of the device (torch.cuda.mem_get_info). None when it cannot be told."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(index)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def verdict(est: Estimate, available: Optional[int], *, seq_len: int, global_batch: int, micro_batch: int,
            device: str = "cpu") -> Optional[tuple]:
    """None when the run fits; ("warn", text) above 0.8x of what is available; ("refuse", text) above 1.0x."""
    if not available:
        return None
    ratio = est.total / available
    if ratio <= WARN_AT:
        return None
    where = "available RAM (MemAvailable)" if device == "cpu" else "free memory on the GPU"
    text = (f"memory: this run needs about {est.describe()} at model.seq_len={seq_len}, "
            f"trainer.global_batch_size={global_batch} (micro-batch {micro_batch} per rank), "
            f"{ratio:.1f}x the {gib(available)} of {where}")
    if ratio <= REFUSE_AT:
        return "warn", text + "; it may not fit"
    hints = ["lower model.seq_len or trainer.global_batch_size"]
    if est.loss > max(LEAN_CHUNK.values()) * 2:          # the full logits: the lean loss holds none
        hints.append("set trainer.lean_loss=true")
    if est.weights + est.grads + est.optimizer > est.activations + est.loss:
        hints.append("shard the model state over more ranks (backend.zero_stage=1-3, trainer.nprocs)")
    return "refuse", (f"{text}: it would be killed for memory. {'; '.join(hints).capitalize()}, or set "
                      "trainer.memory_check=false to start anyway")


# ------------------------------------------------------------------------------------ from a run's config

def shape_for(model_cfg: dict, vocab: Optional[int]) -> Optional[Shape]:
    """The Shape of a model config (TinyGPT, or model=hf from its config.json); None for other models."""
    target = str(model_cfg.get("_target_", ""))
    seq_len = int(model_cfg.get("seq_len") or 0)
    if target.endswith("TinyGPT"):
        if not vocab:
            return None
        return tinygpt_shape(vocab, seq_len, int(model_cfg.get("d_model", 128)), int(model_cfg.get("n_layers", 2)),
                             int(model_cfg.get("n_heads", 4)), int(model_cfg.get("lora_rank", 0) or 0))
    if target.endswith("hf.build_model"):
        path = Path(str(model_cfg.get("path") or "")) / "config.json"
        try:
            config = json.loads(path.read_text())
            lora = model_cfg.get("lora") or {}
            return hf_shape(config, vocab or model_cfg.get("vocab_size"), str(model_cfg.get("dtype") or "float32"),
                            int(lora.get("r", 0) or 0), bool(model_cfg.get("gradient_checkpointing", False)))
        except (OSError, ValueError, TypeError, KeyError):
            return None
    return None


def config_vocab(model_cfg: dict, tokenizer_path: Optional[str]) -> Optional[int]:
    """model.vocab_size, else the vocabulary of the tokenizer file the data config names (read, not run)."""
    if model_cfg.get("vocab_size"):
        return int(model_cfg["vocab_size"])
    if not tokenizer_path:
        return None
    path = Path(tokenizer_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        tok = json.loads(path.read_text())
        vocab = tok["model"]["vocab"]
        return len(vocab) + len([t for t in tok.get("added_tokens") or [] if t.get("content") not in vocab])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def ranks_on_this_machine(nprocs: int) -> int:
    """Ranks sharing this machine's RAM: LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (DeepSpeed's launcher) under
    a launcher, else `nprocs` (trainer.nprocs, or the world size)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or nprocs or 1)


def check_run_memory(cfg, world: int, launching: bool) -> None:
    """The check before the first step (launch/train.py): refuses (RunError, exit 2) a run whose estimate is
    above what is available, warns above 0.8x; `trainer.memory_check=false` skips it. On CUDA each rank checks
    its own device (the launching process never touches CUDA); on CPU the process that starts the ranks, or
    a lone process, checks for every rank of the machine."""
    import sys

    import torch

    from dataflex.utils.errors import RunError

    tr, model = cfg.trainer, cfg.model
    if not bool(tr.get("memory_check", True)):
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank_under_dataflex = os.environ.get("DATAFLEX_MEMORY_CHECKED") == "1"
    if (device == "cuda" and launching) or (device == "cpu" and rank_under_dataflex):
        return
    if device == "cpu" and not launching and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return          # local rank 0 checks for the machine
    shape = shape_for(_plain(model), config_vocab(_plain(model), _tokenizer_of(cfg)))
    if shape is None:
        return
    backend = cfg.backend
    micro = int(tr.global_batch_size) // max(1, world)
    if backend.name == "megatron":      # tensor and pipeline parallel ranks hold a part of the model each
        import dataclasses

        tp, pp = int(backend.get("tensor_model_parallel_size", 1) or 1), int(backend.get("pipeline_model_parallel_size", 1) or 1)
        shape = dataclasses.replace(shape, params=shape.params // (tp * pp), trainable=shape.trainable // (tp * pp),
                                    layers=-(-shape.layers // pp), hidden=max(1, shape.hidden // tp),
                                    ffn=max(1, shape.ffn // tp))
        micro = int(tr.global_batch_size) // max(1, world // (tp * pp))
        if backend.get("micro_batch_size"):
            micro = min(micro, int(backend.micro_batch_size))
    ranks = ranks_on_this_machine(world) if device == "cpu" else 1
    packed_mask = bool(tr.get("packing", False)) and not backend.get("transformer_engine", False)    # THD: no mask
    est = estimate(shape, int(model.seq_len), micro, packing=packed_mask,
                   lean=bool(tr.get("lean_loss", True)) and backend.name != "megatron"
                   and not (backend.name == "deepspeed" and int(backend.get("zero_stage", 0) or 0) == 3),
                   zero_stage=int(backend.get("zero_stage", 0) or 0) if backend.name == "deepspeed" else 0,
                   dp_world=world, bf16=bool(backend.get("bf16", False)), device=device, ranks_here=ranks,
                   new_processes=ranks if launching else ranks - 1)
    found = verdict(est, available_bytes(device, int(os.environ.get("LOCAL_RANK", "0"))), seq_len=int(model.seq_len),
                    global_batch=int(tr.global_batch_size), micro_batch=micro, device=device)
    if found is None:
        return
    kind, text = found
    if kind == "refuse":
        raise RunError(text)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {text}", file=sys.stderr)


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def _tokenizer_of(cfg) -> Optional[str]:
    """The tokenizer file the run will use, found without reading any data (None when it cannot be told)."""
    try:
        from dataflex.data.config import DEFAULT_TOKENIZER, data_config_for, resolve

        data = _plain(data_config_for(cfg.data, cfg.model))
        if data.get("manifest"):
            from dataprep.manifest import tokenizer_path

            return tokenizer_path(resolve(data["manifest"]))
        return resolve(data.get("tokenizer") or DEFAULT_TOKENIZER)
    except Exception:       # a data config the later checks answer with their own message
        return None
