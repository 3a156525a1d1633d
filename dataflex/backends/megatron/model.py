"""Megatron-core's GPTModel at the TinyGPT sizes: parallel state, construction, a layout-free
initialisation (the same weights whatever TP/PP split them) and the forward call.

Packed rows (`dataflex.core.packing`: several samples a row, `segment_ids`, positions restarting at each
sample) reach the GPTModel in one of two forms (`gpt_inputs`):

- **mask** (the local layer spec, on CPU and on CUDA): the rows as they are, position ids restarting per
  sample (the learned position embedding sees each sample's token p at position p, as in its padded
  row) and an explicit attention mask, causal and block-diagonal over the samples, in Megatron's
  convention ([b, 1, T, T] bool, True = masked out). The local `DotProductAttention` applies a given
  mask in place of its causal one (`FusedScaleMaskSoftmax.forward_torch_softmax`), so every sample's
  logits are those of its own padded row.
- **thd** (the Transformer Engine layer spec, `backend.transformer_engine=true`, CUDA): Megatron's
  packed-sequence format: the micro-batch's rows flattened into one sequence [1, R*T] and a
  `PackedSeqParams(qkv_format="thd")` whose `cu_seqlens` mark every sample (and every run of empty
  slots at a row's end) as its own sequence, so `TEDotProductAttention` runs the variable-length kernel
  and never attends across them; no [T, T] mask. The local `DotProductAttention` refuses
  `packed_seq_params` (megatron-core 0.16), which is why THD needs the TE spec."""
from __future__ import annotations

import math
from typing import Callable

import torch

from dataflex.core.packing import block_causal_mask


def layout_name(tp: int, pp: int, dp: int) -> str:
    return f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}, data_parallel_size={dp}"


def model_sizes(model) -> dict:
    """The sizes of dataflex's TinyGPT (the `model` config, instantiated by launch/train.py)."""
    try:
        return {"vocab_size": model.tok_emb.num_embeddings, "d_model": model.tok_emb.embedding_dim,
                "n_layers": len(model.blocks), "n_heads": model.blocks[0].attn.n_heads, "seq_len": model.seq_len}
    except AttributeError:
        raise ValueError(f"backend=megatron builds a Megatron GPTModel from the sizes of model=tiny "
                         f"(d_model, n_layers, n_heads, seq_len); got a {type(model).__name__} "
                         "(model=hf is not supported on this back end)") from None


def init_parallel(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() == tp and ps.get_pipeline_model_parallel_world_size() == pp:
            return
        ps.destroy_model_parallel()
    world = torch.distributed.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"backend=megatron: {world} ranks do not divide into tensor_model_parallel_size={tp} x "
                         f"pipeline_model_parallel_size={pp}")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def build_gpt(sizes: dict, tp: int, pp: int, seed: int, bf16: bool = False, transformer_engine: bool = False):
    """Megatron's GPTModel of dataflex's model sizes (this process's tensor/pipeline shard); the local layer
    spec, or Transformer Engine's (`transformer_engine=True`: needs CUDA and transformer_engine)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    if sizes["n_layers"] % pp:
        raise ValueError(f"model.n_layers={sizes['n_layers']} must divide by pipeline_model_parallel_size={pp}")
    if sizes["n_heads"] % tp:
        raise ValueError(f"model.n_heads={sizes['n_heads']} must divide by tensor_model_parallel_size={tp}")
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = TransformerConfig(
        num_layers=sizes["n_layers"], hidden_size=sizes["d_model"], num_attention_heads=sizes["n_heads"],
        ffn_hidden_size=4 * sizes["d_model"], hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=dtype, params_dtype=dtype,
        bf16=bf16, use_cpu_initialization=True, init_method_std=0.02,
        bias_activation_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False)
    vocab = int(math.ceil(sizes["vocab_size"] / tp) * tp)
    spec = get_gpt_layer_with_transformer_engine_spec() if transformer_engine else get_gpt_layer_local_spec()
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                     max_sequence_length=sizes["seq_len"], pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), position_embedding_type="learned_absolute",
                     share_embeddings_and_output_weights=False)
    layout_free_init(model, seed, config.init_method_std, sizes["n_layers"])
    return model, config


def layout_free_init(model, seed: int, std: float, n_layers: int) -> None:
    """Re-draw every parameter from its own generator, seeded by (seed, its global name), with the
    distributions of Megatron's own initialisation for this layer spec (normal(0, std) weights,
    std / sqrt(2 L) for the attention and MLP output projections, norms 1, biases 0). A
    tensor-parallel shard is its chunk of the full tensor (as Megatron's CPU initialisation splits a
    master weight), and pipeline stages name layers by their global number: every layout starts from
    the same full model, so TP/PP/DP runs can be compared with one process."""
    import hashlib

    from megatron.core import parallel_state as ps
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(layers[int(parts[2])].layer_number - 1)
            canonical = ".".join(parts)
            if name.endswith("bias"):
                p.zero_()
                continue
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            shape = list(p.shape)
            dim = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
            if dim >= 0:
                shape[dim] *= tp
            sigma = std / math.sqrt(2.0 * n_layers) if parts[-2] in ("linear_proj", "linear_fc2") else std
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{canonical}".encode()).digest()[:7], "little"))
            full = torch.empty(shape, dtype=torch.float32).normal_(0.0, sigma, generator=g)
            p.copy_(full.chunk(tp, dim)[tp_rank] if dim >= 0 else full)


def megatron_mask(batch: dict) -> torch.Tensor | None:
    """The attention mask of a packed batch in Megatron's convention ([b, 1, T, T] bool, True = masked out:
    another sample or a later token); None on a padded batch (the model's own causal mask)."""
    if "segment_ids" not in batch:
        return None
    return ~block_causal_mask(batch["position_ids"], batch["segment_ids"])


def thd_params(batch: dict):
    """Megatron's packed-sequence parameters of a packed batch flattened into one sequence [1, R*T]: a new
    sequence at every row start and wherever the segment changes (each sample, each run of empty slots)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    seg = batch["segment_ids"]
    R, T = seg.shape
    key = (seg + 1) + torch.arange(R, device=seg.device).unsqueeze(1) * (int(seg.max()) + 2 if seg.numel() else 1)
    flat = key.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, torch.tensor([R * T], device=seg.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def gpt_inputs(batch: dict, thd: bool = False) -> tuple[tuple, dict, Callable]:
    """(positional args, keyword args, unflatten) of a GPTModel call on `batch` (module docstring): padded rows
    as they are; packed rows with the block-diagonal mask, or (`thd=True`) flattened into one THD sequence,
    where `unflatten` turns the model's [1, R*T, ...] output back into [R, T, ...]."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    if thd and "segment_ids" in batch:
        shape = tuple(ids.shape)
        kwargs = {"packed_seq_params": thd_params(batch)}
        if "labels" in batch:
            kwargs["labels"] = batch["labels"].reshape(1, -1)
        return ((ids.reshape(1, -1), pos.reshape(1, -1), None), kwargs,
                lambda out: out.reshape(*shape, *out.shape[2:]))
    kwargs = {"labels": batch["labels"]} if "labels" in batch else {}
    return (ids, pos, megatron_mask(batch)), kwargs, (lambda out: out)


def gpt_forward(call, batch: dict):
    """A plain forward of a GPTModel (tensor and pipeline size 1): logits [B, T, V]; packed rows attend within
    each sample (`megatron_mask`)."""
    return call(batch["input_ids"], batch["position_ids"], megatron_mask(batch))
