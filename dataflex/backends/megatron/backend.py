"""`backend=megatron`: a megatron.core GPTModel trained through Megatron's own schedule and optimizer.

What is Megatron's and what is dataflex's:

- **Model.** `GPTModel` with the local (non Transformer Engine) layer spec, built from the `model`
  config's sizes (d_model, n_layers, n_heads, seq_len; vocabulary from the tokenizer, padded up to a
  multiple of the tensor-parallel size), learned absolute positions, untied output layer, no
  dropout, weights drawn per parameter from (`trainer.seed`, its global name) with Megatron's init
  distributions (`layout_free_init`), so every tensor/pipeline/data layout starts from the same full
  model; wrapped in Megatron's `DistributedDataParallel`.
- **Packed rows** (`trainer.packing=true`, the default): the schedule's micro-batches are row ranges with the
  samples they hold (`core.packing.slice_rows`); each is called with position ids restarting per sample
  and an explicit block-diagonal causal attention mask (the local layer spec, CPU and CUDA), or, with
  `backend.transformer_engine=true` (CUDA), flattened into one THD sequence with `PackedSeqParams`
  (`model.gpt_inputs`). Per-sample losses, the loss_func's signal and the gradients are those of the same
  samples padded one a row; probes take packed batches too (losses and token losses per sample).
- **Parallel layout.** `parallel_state.initialize_model_parallel(tp, pp)`; the data-parallel size
  is world / (tp * pp). The sampler is dataflex's (the external data-loader path, no static blend):
  `DataFlex(rank=data_parallel_rank, world_size=data_parallel_size)` so every rank computes the same
  global batch from the shared seed and takes its data-parallel slice; the tensor and pipeline
  ranks of one model replica take the same slice. `dist.use_group(data_parallel_group)` makes every
  dataflex collective (the per-step loss gather, probe gathers, rank checks) run over the
  data-parallel group only.
- **Schedule.** `get_forward_backward_func()` (no pipelining, or 1F1B for pipeline size > 1) runs the
  local batch as `local / backend.micro_batch_size` micro-batches (null: one micro-batch).
  Optimizer: `get_megatron_optimizer` (Adam; without Apex/TE it is torch's AdamW, wrapped in
  Megatron's FP32/Chained optimizer with its gradient clipping; `use_distributed_optimizer=true`
  shards its state over data-parallel ranks), the learning rate set from dataflex's warmup+cosine
  schedule (`lr_lambda`) before every step.
- **Signals and the loss_func.** `forward_backward(batch, flex.loss)` is the training step. The
  `loss_func` handed to the schedule receives Megatron's per-token loss [b, T] and calls
  `flex.loss.from_token_loss(token_loss, batch)`: per-sample losses, the gather over the
  data-parallel group, the plugins' AFTER_LOSS, and the weighted scalar with the global
  denominator (Megatron's DDP then averages gradients over data-parallel ranks, which with that
  denominator is the gradient of the global loss). Only the last pipeline stage runs a loss_func.
  So that every rank's plugins see the same state, the last stage's per-token losses are
  broadcast over the pipeline group after the schedule and the other stages call
  `from_token_loss` on them (without gradient): every rank runs the same gather over its own
  data-parallel group and the same plugins on the same numbers (tensor-parallel ranks of the last
  stage compute identical per-token losses through Megatron's vocab-parallel cross entropy).
  The per-step rank check (a hash of the data decisions inside the loss gather) therefore compares
  data-parallel ranks; tensor/pipeline ranks of one replica get identical inputs by construction.
  A plugin that probes the model from AFTER_LOSS (inside the last stage's loss_func) runs a nested
  forward-only schedule: fine without pipelining, not supported with pipeline stages.
  With one micro-batch this is one pass. With several, weights for the whole local batch must be
  known before the first backward (1F1B interleaves them), so the step first runs the schedule in
  forward-only mode, weighs the full batch once, and trains with a loss_func that applies the
  resulting per-token coefficients (the gradient of the weighted scalar with respect to the
  per-token losses, which it is linear in): one extra forward per step.
- **Probes.** `MegatronInterface.probe` runs the same schedule with `forward_only=True`; losses and
  token losses come from the last stage, broadcast over the pipeline group. Logits, embeddings and
  per-sample gradients need the whole model in one process: tensor and pipeline size 1 (per-sample
  gradients through dataflex's torch.func / fallback path on the GPTModel module); other layouts
  raise an error naming the layout.
- **Checkpoints.** `RUN/checkpoints/step_N/`: `megatron_tpXX_ppXX.pt` per model shard (module and
  optimizer state dicts, Megatron's own, written by data-parallel rank 0 of each shard), `dataflex.pt`
  (sampler, plugins, RNG: written by global rank 0; Megatron's consumed-samples counter cannot
  rebuild a dynamic mixture) and `schedule.pt` (step counter). Resuming needs the same tp/pp layout
  (this is torch.save of each shard, not Megatron's resharding distributed checkpoint); the
  distributed optimizer's sharded state is not saved (an error says so).
- **Devices.** CUDA + NCCL where a GPU exists (one device per local rank). Without one, every call
  into Megatron runs inside `megatron_cpu.cpu_device()`, the CPU device shim (gloo).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dataflex.backends.base import Backend, lr_lambda
from dataflex.backends.megatron.cpu_shim import cpu_device
from dataflex.backends.megatron.model import (
    build_gpt,
    gpt_forward,
    gpt_inputs,
    init_parallel,
    layout_name,
)
from dataflex.core.loss import per_sample_from_token_loss
from dataflex.core.packing import Segments, slice_rows
from dataflex.grad.interface import TorchInterface
from dataflex.utils import dist


def _broadcast_from_last_stage(t: torch.Tensor | None, shape, device) -> torch.Tensor:
    """The last pipeline stage's tensor on every stage of this pipeline (a no-op without pipelining)."""
    from megatron.core import parallel_state as ps
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return t
    if t is None:
        t = torch.empty(shape, dtype=torch.float32, device=device)
    t = t.float().contiguous()
    torch.distributed.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                                group=ps.get_pipeline_model_parallel_group())
    return t


class MegatronInterface(TorchInterface):
    """dataflex's signal interface on a Megatron model: probes through the schedule (forward only)."""

    def __init__(self, backend: "MegatronBackend"):
        super().__init__(backend.module, forward=gpt_forward)
        self.backend = backend

    def _whole_model(self, what: str) -> None:
        b = self.backend
        if b.tp * b.pp > 1:
            raise NotImplementedError(
                f"{what} needs the whole model in one process; the Megatron layout here is "
                f"{layout_name(b.tp, b.pp, b.dp)} (supported: tensor and pipeline size 1). Per-sample losses "
                "and probe losses/token losses work under every layout")

    @torch.no_grad()
    def probe(self, batch: dict, output: str = "loss"):
        batch = self.backend.to_device(batch)
        if output in ("loss", "token_loss"):
            token_loss = self.backend.token_losses(batch)
            mask = batch["loss_mask"].to(token_loss)
            seg = Segments.of(batch)
            if output == "token_loss":       # packed: per sample [S, T], as a padded batch gives them
                return token_loss * mask if seg is None else seg.unpack(token_loss * mask)
            if seg is None:
                return per_sample_from_token_loss(token_loss, mask)
            return seg.sum(token_loss * mask) / seg.sum(mask).clamp(min=1.0)
        self._whole_model(f"probe(output={output!r})")
        with cpu_device():
            return super().probe(batch, output)

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        return self.probe(batch, "loss")

    def per_sample_grads(self, batch, *args, **kwargs):
        self._whole_model("per-sample gradients")
        with cpu_device():
            return super().per_sample_grads(batch, *args, **kwargs)

    def per_sample_grad_norms(self, batch, *args, **kwargs):
        self._whole_model("per-sample gradient norms")
        with cpu_device():
            return super().per_sample_grad_norms(batch, *args, **kwargs)

    def per_sample_grad_dots(self, batch, *args, **kwargs):
        self._whole_model("per-sample gradient inner products")
        with cpu_device():
            return super().per_sample_grad_dots(batch, *args, **kwargs)

    def batch_grad(self, batch, *args, **kwargs):
        self._whole_model("batch gradients")
        with cpu_device():
            return super().batch_grad(batch, *args, **kwargs)


class MegatronBackend(Backend):
    name = "megatron"

    def __init__(self, sizes: dict, global_batch_size: int, tensor_model_parallel_size: int = 1,
                 pipeline_model_parallel_size: int = 1, micro_batch_size=None, use_distributed_optimizer: bool = False,
                 bf16: bool = False, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0,
                 max_steps: int = 1000, grad_clip: float = 1.0, seed: int = 0, transformer_engine: bool = False):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        from dataflex.backends.base import setup_distributed
        setup_distributed("megatron")
        self.tp, self.pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
        if transformer_engine and not torch.cuda.is_available():
            raise ValueError("backend.transformer_engine=true needs CUDA (Transformer Engine's layers and its THD "
                             "packed-sequence attention); leave it false on this machine")
        self.thd = bool(transformer_engine)     # packed rows as Megatron's THD sequences (model.gpt_inputs)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device = torch.device("cuda", torch.cuda.current_device())
        with cpu_device():
            init_parallel(self.tp, self.pp)
            self.dp = ps.get_data_parallel_world_size()
            self.data_parallel_rank, self.data_parallel_size = ps.get_data_parallel_rank(), self.dp
            if global_batch_size % self.dp:
                raise ValueError(f"trainer.global_batch_size={global_batch_size} must divide by the data-parallel "
                                 f"size {self.dp} ({layout_name(self.tp, self.pp, self.dp)})")
            self.local_batch = global_batch_size // self.dp
            self.micro_batch_size = int(micro_batch_size or self.local_batch)
            if self.local_batch % self.micro_batch_size:
                raise ValueError(f"backend.micro_batch_size={self.micro_batch_size} must divide the local batch "
                                 f"{self.local_batch} (global {global_batch_size} / data-parallel {self.dp})")
            self.seq_len = sizes["seq_len"]
            self.module, self.config = build_gpt(sizes, self.tp, self.pp, seed, bf16, transformer_engine)
            if torch.cuda.is_available():
                self.module.cuda()
            self.model = DistributedDataParallel(
                self.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                           use_distributed_optimizer=use_distributed_optimizer),
                self.module)
            self.config.finalize_model_grads_func = finalize_model_grads
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay, adam_beta1=0.9,
                                adam_beta2=0.95, clip_grad=grad_clip or 0.0, bf16=bf16, params_dtype=self.config.params_dtype,
                                use_distributed_optimizer=use_distributed_optimizer), [self.model])
        self.use_distributed_optimizer = use_distributed_optimizer
        self.lr, self.lr_at = lr, lr_lambda(warmup_steps, max_steps) if warmup_steps or max_steps else (lambda s: 1.0)
        self.steps_done = 0
        self.scheduler = None
        dist.use_group(ps.get_data_parallel_group())
        self.interface = MegatronInterface(self)

    # -- the schedule ------------------------------------------------------------------------------
    def _is_last_stage(self) -> bool:
        from megatron.core import parallel_state as ps
        return ps.is_pipeline_last_stage()

    def _run(self, batch: dict, micro: int, loss_of, forward_only: bool):
        """Megatron's forward/backward schedule over `batch` cut into micro-batches of `micro` rows (a packed
        batch's rows with the samples they hold); `loss_of(token_loss, micro_batch, index) -> (scalar, stats)`
        is the loss_func's body, `token_loss` [rows, T] whatever form the model was called in."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        n = batch["input_ids"].shape[0]
        pieces = [slice_rows(batch, i, i + micro) for i in range(0, n, micro)]
        position = iter(range(len(pieces)))
        thd = self.thd and "segment_ids" in batch

        def forward_step(data_iterator, model):
            mb, index = next(data_iterator), next(position)
            args, kwargs, unflatten = gpt_inputs(mb, thd)
            out = model(*args, **kwargs)

            def loss_func(token_loss):
                return loss_of(unflatten(token_loss), mb, index)
            return out, loss_func

        # THD: each micro-batch is one sequence of micro * T tokens (the shapes pipeline stages exchange)
        seq_length, micro_size = (self.seq_len * micro, 1) if thd else (self.seq_len, micro)
        with cpu_device():
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(pieces), model=[self.model],
                num_microbatches=len(pieces), seq_length=seq_length, micro_batch_size=micro_size,
                forward_only=forward_only)

    def token_losses(self, batch: dict) -> torch.Tensor:
        """Per-token losses [B, T] of the batch through the schedule in forward-only mode (eval mode,
        no gradients), on every rank: the last stage's values, broadcast over the pipeline group."""
        was = self.module.training
        self.module.eval()
        try:
            store = self._run(batch, batch["input_ids"].shape[0], lambda tok, mb, i: (
                tok.sum(), {"token_loss": tok.detach().float().clone()}), forward_only=True)
        finally:
            self.module.train(was)
        local = torch.cat([s["token_loss"] for s in store]) if store else None
        return _broadcast_from_last_stage(local, tuple(batch["input_ids"].shape), batch["input_ids"].device)

    def forward_backward(self, batch: dict, loss_wrapper) -> torch.Tensor:
        """One training step's forward and backward through Megatron's schedule, with dataflex's loss
        wrapper in the loss_func (see the module docstring); returns the weighted scalar, detached."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.module.train()
        n = batch["input_ids"].shape[0]
        shape = tuple(batch["input_ids"].shape)
        if n // self.micro_batch_size <= 1:
            seen = {}

            def fused(token_loss, mb, index):
                seen["token_loss"] = token_loss.detach().float().clone()
                loss = loss_wrapper.from_token_loss(token_loss, mb)
                seen["loss"] = loss.detach().clone()
                return loss, {"loss": seen["loss"]}
            self._run(batch, n, fused, forward_only=False)
            if self._is_last_stage():
                if self.pp > 1:
                    _broadcast_from_last_stage(seen["token_loss"], shape, batch["input_ids"].device)
                return seen["loss"]
            token_loss = _broadcast_from_last_stage(None, shape, batch["input_ids"].device)
            with torch.no_grad():
                return loss_wrapper.from_token_loss(token_loss, batch).detach()
        # several micro-batches: weigh the whole local batch first, then train with the coefficients
        token_loss = self.token_losses(batch).detach().requires_grad_(True)
        loss = loss_wrapper.from_token_loss(token_loss, batch)
        (coeff,) = torch.autograd.grad(loss, token_loss)
        micro, count = self.micro_batch_size, n // self.micro_batch_size

        def weighted(tok, mb, index):
            c = coeff[index * micro:(index + 1) * micro].to(tok)
            safe = torch.where(torch.isfinite(tok.detach()), tok, torch.zeros((), dtype=tok.dtype, device=tok.device))
            value = (c * safe).sum() * count      # Megatron divides each micro-batch's loss by their number
            return value, {}
        self._run(batch, micro, weighted, forward_only=False)
        return loss.detach()

    def forward(self, batch):
        raise NotImplementedError("backend=megatron runs forward and backward together in Megatron's schedule: "
                                  "call backend.forward_backward(batch, flex.loss), then backend.step()")

    def step(self, loss=None):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self.lr_at(self.steps_done)
        with cpu_device():
            self.optimizer.step()
        self.steps_done += 1

    # -- checkpoints -------------------------------------------------------------------------------
    def _shard_file(self, path: Path) -> Path:
        from megatron.core import parallel_state as ps
        return path / f"megatron_tp{ps.get_tensor_model_parallel_rank():02d}_pp{ps.get_pipeline_model_parallel_rank():02d}.pt"

    def save(self, path: Path, client_state: dict) -> None:
        if self.use_distributed_optimizer and self.dp > 1:
            raise NotImplementedError("checkpoints of backend=megatron with use_distributed_optimizer=true and "
                                      f"data-parallel size {self.dp} are not supported (the optimizer state is sharded)")
        path.mkdir(parents=True, exist_ok=True)
        if self.data_parallel_rank == 0:
            with cpu_device():
                torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "layout": (self.tp, self.pp)}, self._shard_file(path))
        if torch.distributed.get_rank() == 0:
            torch.save({"client": client_state, "steps_done": self.steps_done}, path / "dataflex.pt")
        torch.distributed.barrier()

    def load(self, path: Path) -> dict:
        path = Path(path)
        shard = self._shard_file(path)
        if not shard.exists():
            raise FileNotFoundError(f"{shard} is missing: this checkpoint was written with another Megatron layout "
                                    f"than {layout_name(self.tp, self.pp, self.dp)}")
        from dataflex.utils.safeload import load_weights_only

        state = load_weights_only(shard, "trainer.resume: checkpoint file", map_location=self.device)
        with cpu_device():
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        meta = load_weights_only(path / "dataflex.pt", "trainer.resume: checkpoint file")
        self.steps_done = meta["steps_done"]
        return meta["client"]
