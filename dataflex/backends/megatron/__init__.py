"""Megatron-core as a back end: `backend.MegatronBackend` (its schedule, optimizer and checkpoints),
`model` (GPTModel construction) and `cpu_shim` (the CUDA-only calls on a CPU machine)."""


def __getattr__(name):
    if name == "MegatronBackend":          # megatron.core is imported only when this back end is used
        from dataflex.backends.megatron.backend import MegatronBackend
        return MegatronBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
