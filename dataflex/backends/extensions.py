"""torch C++-extension locks left by a killed first DeepSpeed start (every later start would wait on them), the
line a first start prints before compiling a DeepSpeed op (silent for minutes otherwise), and the shared-memory
buffer DeepSpeed's CPU comm op would leave in /dev/shm after every run."""
from __future__ import annotations

import os
import sys
import time


def extension_roots() -> list:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return [root]
    base = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    return [base]


def _busy_dirs() -> set:
    """Working folders of live processes (a compiler run by torch works inside the extension's folder)."""
    out = set()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                out.add(os.path.realpath(os.readlink(f"/proc/{pid}/cwd")))
            except OSError:
                pass
    return out


def clear_stale_extension_locks(max_age_s: float = 300.0, roots=None, quiet: bool = False) -> list:
    """Remove torch C++-extension `lock` files older than max_age_s whose folder no live process works
    in (a first DeepSpeed start killed while compiling leaves one, and every later start waits on it
    forever). Returns the removed paths; prints one line for each."""
    removed, busy = [], None
    for root in roots or extension_roots():
        if not os.path.isdir(root):
            continue
        for dirpath, _, names in os.walk(root):
            if "lock" not in names:
                continue
            lock = os.path.join(dirpath, "lock")
            try:
                age = time.time() - os.path.getmtime(lock)
            except OSError:
                continue
            if age < max_age_s:
                continue
            busy = _busy_dirs() if busy is None else busy
            if os.path.realpath(dirpath) in busy:
                continue
            try:
                os.unlink(lock)
            except OSError:
                continue
            removed.append(lock)
            if not quiet:
                print(f"dataflex: removed a stale torch extension lock {lock} ({age / 60:.0f} min old, no process "
                      "building there: an earlier start was killed while compiling)", file=sys.stderr)
    return removed


# A first start that compiles a DeepSpeed op is silent for minutes: say so at once. About how long each takes
# on a few cores (measured for the comm op: ~35 s on 2 busy cores, docs/benchmarks.md; the others: reported).
BUILD_MINUTES = {"deepspeed_shm_comm": 1, "deepspeed_ccl_comm": 1, "cpu_adam": 2, "cpu_adagrad": 2, "cpu_lion": 2,
                 "fused_adam": 1, "fused_lamb": 1, "fused_lion": 1}
# a DeepSpeed JSON's optimizer type -> the op builder it needs (offloaded to the CPU, on the GPU)
OPTIMIZER_OPS = {"adam": ("CPUAdamBuilder", "FusedAdamBuilder"), "adamw": ("CPUAdamBuilder", "FusedAdamBuilder"),
                 "adagrad": ("CPUAdagradBuilder", None), "lion": ("CPULionBuilder", "FusedLionBuilder"),
                 "lamb": (None, "FusedLambBuilder")}


def extension_build_dir(name: str) -> str:
    """Where torch's JIT build puts extension `name` (torch.utils.cpp_extension's rule; nothing is created)."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                 f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        root = os.path.join(get_default_build_root(),
                            f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}")
    return os.path.join(root, name)


def ops_to_build(builder_names) -> list:
    """[(op name, build folder)] of the DeepSpeed ops among `builder_names` (e.g. "ShareMemCommBuilder") that the
    accelerator uses, that were not installed prebuilt and have no JIT build yet: the ones a start will compile."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
    except Exception:      # no DeepSpeed: nothing to build
        return []
    out = []
    for builder_name in builder_names:
        try:
            builder = get_accelerator().create_op_builder(builder_name)
        except Exception:
            builder = None
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        if installed_ops.get(builder.NAME, False):
            continue
        folder = extension_build_dir(builder.NAME)
        if not os.path.isfile(os.path.join(folder, builder.NAME + ".so")):
            out.append((builder.NAME, folder))
    return out


def announce_op_builds(builder_names, quiet: bool = False) -> list:
    """One line per op the start is about to compile (`building DeepSpeed's OP op (first run only, ~N min) ...`),
    printed by local rank 0 before the silent build; returns the op names."""
    todo = ops_to_build(builder_names)
    if not quiet and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        for name, folder in todo:
            print(f"dataflex: building DeepSpeed's {name} op (first run only, ~{BUILD_MINUTES.get(name, 2)} min; "
                  f"cached in {folder}) ...", file=sys.stderr, flush=True)
    return [name for name, _ in todo]


def optimizer_builders(config: dict) -> list:
    """The op builders a DeepSpeed JSON's optimizer section needs (none without one: dataflex's torch AdamW)."""
    opt = config.get("optimizer") if isinstance(config, dict) else None
    if not isinstance(opt, dict):
        return []
    zero = config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    on_cpu = isinstance(offload, dict) and (offload.get("device") or "none") == "cpu"
    pair = OPTIMIZER_OPS.get(str(opt.get("type", "")).lower(), (None, None))
    chosen = pair[0] if on_cpu else pair[1]      # the accelerator's own builder of that name (CPU: its fused_adam)
    return [chosen] if chosen else []


# DeepSpeed's CPU comm op (`ShareMemCommBuilder`, deepspeed/ops/csrc/cpu/comm/shm.cpp) creates one POSIX shared-memory
# buffer per rank at `init_distributed`, named from the uid, MASTER_ADDR, MASTER_PORT and the rank, and maps every
# other rank's; it never unlinks them (its `shared_close` is not called), so each run, finished or killed, leaves
# ~66 MB of RAM per rank in /dev/shm until the machine reboots (a day of short runs filled 16 GB here).
SHM_BUFFER = "deepspeed_allreduce_buffer"
_RELEASED: set = set()


def shm_buffer_path(rank: int, shm_root: str = "/dev/shm") -> str:
    """Where DeepSpeed's CPU comm op puts rank `rank`'s buffer for this process group (MASTER_ADDR, MASTER_PORT)."""
    name = f"{SHM_BUFFER}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    return os.path.join(shm_root, name)


def release_shm_buffer(shm_root: str = "/dev/shm") -> "str | None":
    """Unlink this rank's DeepSpeed comm buffer once every rank has mapped every other's (a barrier after
    `deepspeed.init_distributed`, which maps them all before it returns): the mappings stay valid, and the memory
    goes back when the group's last process exits, however it exits. Only the name this rank's own op created
    (its uid, the group's address and port, its rank) is removed. Call on every rank; a no-op without the op (GPU,
    ranks on several hosts) or when already done. Returns the path unlinked, or None."""
    try:
        import deepspeed.comm.comm as dscomm
    except Exception:
        return None
    cdb = getattr(dscomm, "cdb", None)
    if getattr(cdb, "shm_comm_op", None) is None or not os.path.isdir(shm_root):
        return None
    import torch.distributed as tdist

    rank = tdist.get_rank() if tdist.is_initialized() else 0
    path = shm_buffer_path(rank, shm_root)
    if path in _RELEASED:
        return None
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()                     # every rank has mapped every buffer: the names are no longer needed
    _RELEASED.add(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    return path
