"""The CPU device shim: real megatron.core code on a machine without a CUDA device.

Megatron-core (0.16) is written for CUDA and has a few hard-coded CUDA calls outside Transformer
Engine and Apex: buffers allocated with `device="cuda"` or `device=torch.cuda.current_device()`
(schedules, the grad buffers of its DDP, the optimizer's scalars, pipeline p2p shape exchange),
`torch.cuda.synchronize()` in pipeline p2p, the CUDA RNG state functions its RNG tracker forks, and
a `grad.type() == 'torch.cuda.FloatTensor'` assertion in gradient clipping. Nothing else in it needs
a GPU: the math is plain torch, the collectives go through torch.distributed (gloo on CPU).

`cpu_device()` is a context manager that makes those calls mean "this CPU" while it is active:

- a `TorchFunctionMode` maps a CUDA device given to any torch function or tensor method (the
  `device=` keyword, a positional device of `.to(...)`, a bare int device index) to the CPU, makes
  `Tensor.cuda()` return the tensor itself, and answers `Tensor.type()` with the CUDA spelling of
  the CPU tensor's type (`torch.FloatTensor` -> `torch.cuda.FloatTensor`), since inside Megatron the
  CPU plays the part of "the current device";
- stand-ins for `torch.cuda.current_device` (0), `synchronize` (no-op), `is_available` stays False,
  and for the RNG state functions the RNG tracker uses (`get_rng_state`, `set_rng_state`,
  `manual_seed`, `random.get_rng_state`, Megatron's `_set_cuda_rng_state`): they keep one extra CPU
  `torch.Generator` as the "device generator", so the tracker forks and restores a real state.
  Randomness of CPU ops themselves comes from torch's CPU generator (dropout is 0 in dataflex's
  models, so training is deterministic either way).

It changes no Megatron code and mocks nothing: every forward, backward, schedule, collective and
optimizer step is Megatron's own. It is entered only by the Megatron back end and only when
`torch.cuda.is_available()` is False (`needed()`); on a CUDA machine the back end runs Megatron as
is, with NCCL.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.RLock()
_depth = 0
_saved: dict = {}
_generator = torch.Generator()


def needed() -> bool:
    return not torch.cuda.is_available()


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuForCuda(TorchFunctionMode):
    """CUDA devices in torch calls -> the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not args[0].is_cuda else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def _get_rng_state(device="cuda"):
    return _generator.get_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    _generator.set_state(new_state)


def _manual_seed(seed):
    _generator.manual_seed(int(seed))


def _patch():
    import megatron.core.tensor_parallel.random as mrandom
    replacements = [
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "synchronize", lambda device=None: None),
        (torch.cuda, "get_rng_state", _get_rng_state),
        (torch.cuda, "set_rng_state", lambda new_state, device="cuda": _set_rng_state(new_state)),
        (torch.cuda, "manual_seed", _manual_seed),
        (torch.cuda.random, "get_rng_state", _get_rng_state),
        (mrandom, "_set_cuda_rng_state", _set_rng_state),
    ]
    for owner, name, value in replacements:
        _saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, value)


def _unpatch():
    for (owner, name), value in _saved.items():
        setattr(owner, name, value)
    _saved.clear()


@contextlib.contextmanager
def cpu_device():
    """Run Megatron-core on the CPU inside this block (re-entrant; a no-op where CUDA exists)."""
    global _depth
    if not needed():
        yield
        return
    with _lock:
        if _depth == 0:
            _patch()
        _depth += 1
    try:
        with _CpuForCuda():
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _unpatch()
