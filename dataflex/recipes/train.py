"""Train a causal LM with data that takes part in training.

    deepspeed launch/train.py +mixer=bandit                     # the main job (DeepSpeed engine)
    python launch/train.py backend=torch +selector=loss         # one process, plain torch
    deepspeed --num_gpus 2 launch/train.py +reweighter=loss     # two processes (gloo on CPU)
    python launch/train.py -m +mixer=static,bandit              # a sweep; then launch/compare.py
    python launch/train.py -m +mixer=static,bandit trainer.nprocs=2   # each job on two ranks

The loop below is the whole training loop: DataFlex draws each global batch from the current
domain weights, runs the plugins at their events, and turns per-sample losses into the scalar
that the back end backpropagates.
"""
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import dataflex.run.reference  # noqa: E402,F401  (plugins' `reference=RUN_DIR` loads through it)
from dataflex.run.checkpoints import (  # noqa: E402
    TMP_SUFFIX,
    checkpoint_info,
    checkpoint_run_folder,
    mark_complete,
    resolve_resume,
)
from dataflex.run.config import (  # noqa: E402
    check_config,
    check_deepspeed_config,
    check_known_keys,
    check_override_typos,
    reference_keys,
)
from dataflex.run.plugins import (  # noqa: E402
    PLUGIN_GROUPS,
    check_plugin_needs,
    check_plugin_settings,
    instantiate_plugin,
)
from dataflex.run.yaml_files import check_yaml_aliases  # noqa: E402
from dataflex.run.faults import fault  # noqa: E402
from dataflex.run.launching import (  # noqa: E402
    config_file,
    launch_ranks,
    mark_failed_run,
    needs_launch,
    port_clash_message,
    prepare_argv,
    prepare_run_dir,
    remove_failed_run,
    resume_config,
    run_strategy,
)
from dataflex.run.lock import LOCK_NAME, hold_run_folder  # noqa: E402
from dataflex.run.memory import check_run_memory  # noqa: E402
from dataflex.run.stopping import PoliteStop, watch_launcher  # noqa: E402
from dataflex.utils.console import ConsoleLog, quiet_third_party  # noqa: E402
from dataflex.utils.errors import RunError, UserError  # noqa: E402
from dataflex.utils.paths import configs_dir

sys.argv = sys.argv[:1] + prepare_argv(sys.argv[1:])
check_override_typos(sys.argv[1:], str(configs_dir()))
check_yaml_aliases(sys.argv[1:], str(configs_dir()), "train", "train")   # no alias bomb reaches Hydra

from functools import partial

import hydra  # noqa: E402
import torch
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataflex.backends import build_backend, setup_distributed  # noqa: E402
from dataflex.data.config import data_config_for  # noqa: E402  (model=hf: the model's own tokenizer)
from dataflex.data.domains import load_domains  # noqa: E402
from dataflex.data.mixture import MixtureDataset  # noqa: E402
from dataflex.data.provenance import sample_table  # noqa: E402
from dataflex.run.outputs import RunOutputs, print_comparison, start_wandb  # noqa: E402
from dataflex.session import DataFlex  # noqa: E402
from dataflex.utils import dist  # noqa: E402
from dataflex.utils.errors import DataConfigError  # noqa: E402


def rank_script() -> str:
    """The script each rank runs: the one this process was started as (launch/train.py), else this module."""
    started = os.path.abspath(sys.argv[0])
    return started if started.endswith(".py") and os.path.isfile(started) else os.path.abspath(__file__)


@hydra.main(config_path=str(configs_dir()), config_name="train", version_base=None)
def main(cfg):
    """Settle the config and the run folder, then train; console output and errors also go to
    RUN_DIR/train.log, and a run that fails before its first step leaves no folder behind."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    writer = int(os.environ.get("RANK", "0")) == 0     # ranks > 0 run in "." and write nothing
    quiet_third_party(bool(cfg.logger.get("verbose", False)))
    watch_launcher()        # a rank whose launcher is killed outright stops too (no orphan keeps training)
    lock = hold_run_folder(run_dir) if writer else None     # one writer per run folder (exit 2 if one runs)
    fresh = writer and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", LOCK_NAME}
    done = owned = False
    try:
        with ConsoleLog(run_dir / "train.log") if writer else contextlib.nullcontext():
            try:
                cfg, ckpt = settle(cfg, hc, run_dir, writer)
                owned = writer and not needs_launch(cfg.trainer.nprocs)    # the folder is this run's now
                if needs_launch(cfg.trainer.nprocs):
                    result = launch_ranks(rank_script(), cfg.trainer.nprocs, cfg.backend.name)
                else:
                    result = train(cfg, hc, ckpt)
            except (UserError, DataConfigError) as e:     # the user's to fix: one line, exit 2
                print(f"train: error: {e}", file=sys.stderr)
                sys.exit(2)
        done = True
        return result
    finally:
        if not done and fresh:
            remove_failed_run(run_dir, explicit=any(o.startswith("hydra.run.dir=") for o in hc.overrides.task))
        if not done and owned:      # its outputs, if any are left and nothing can continue them: the retry reuses it
            mark_failed_run(run_dir)
        if lock is not None:
            lock.release()


def settle(cfg, hc, run_dir: Path, writer: bool):
    """A resume takes its run's own config.yaml plus this command line's overrides (warning about those
    that change the trajectory); unknown trainer/backend keys are refused; the run folder is made fit."""
    here = Path(os.environ.get("DATAFLEX_RUN_DIR", run_dir)) if not writer else run_dir
    ckpt = resolve_resume(cfg.trainer.get("resume"), here)
    if ckpt is not None:
        cfg, notes = resume_config(cfg, list(hc.overrides.task), ckpt)
        for note in notes if writer else ():
            print(f"warning: {note}", file=sys.stderr)
    configs = configs_dir()
    check_known_keys(cfg, "trainer", reference_keys(configs, "trainer", "default"))
    backend_keys = reference_keys(configs, "backend", cfg.backend.name)
    if backend_keys is not None:
        check_known_keys(cfg, "backend", backend_keys)
    check_config(cfg)                       # types and ranges, before any data is read
    check_deepspeed_config(cfg, int(cfg.trainer.nprocs) if needs_launch(cfg.trainer.nprocs)
                           else int(os.environ.get("WORLD_SIZE", "1")))    # backend.config: the user's JSON
    check_plugin_settings(cfg)              # every mixer, selector and reweighter setting too
    launching = needs_launch(cfg.trainer.nprocs)
    check_run_memory(cfg, int(cfg.trainer.nprocs) if launching else int(os.environ.get("WORLD_SIZE", "1")),
                     launching)             # a run that cannot fit: refused before any data is read
    if writer and not needs_launch(cfg.trainer.nprocs):
        folder = checkpoint_run_folder(ckpt) if ckpt is not None else None
        own = folder is not None and folder.resolve() == run_dir.resolve()
        prepare_run_dir(run_dir, int(ckpt.name.split("_")[-1]) if own else None,
                        bool(cfg.trainer.get("overwrite", False)))
    return cfg, ckpt


def train(cfg, hc, ckpt):
    started = time.time()
    tr = cfg.trainer
    try:
        made_group = setup_distributed(cfg.backend.name)
    except Exception as e:
        clash = port_clash_message(e)
        if clash:
            raise RunError(clash) from None
        raise
    rank, world = dist.rank(), dist.world_size()
    run_dir = Path(dist.broadcast_object(HydraConfig.get().runtime.output_dir))
    torch.manual_seed(tr.seed)

    try:
        domains = load_domains(data_config_for(cfg.data, cfg.model), cfg.model.seq_len, tr.max_val_samples)
    except DataConfigError as e:
        raise DataConfigError(f"{e}\n  (data config: {config_file('data')})") from None
    vocab = domains.tokenizer.vocab_size
    if cfg.model.get("vocab_size") and vocab > cfg.model.vocab_size:
        raise RunError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary ({vocab} "
                       f"tokens, {domains.tokenizer.path}): token ids would index past the embedding; leave "
                       "model.vocab_size unset (null) to take the tokenizer's")
    val = MixtureDataset(domains.val) if domains.val else None
    model = instantiate(cfg.model, vocab_size=cfg.model.vocab_size or domains.tokenizer.vocab_size, seed=tr.seed)
    backend = build_backend(cfg.backend.name, model, tr.global_batch_size, world, lr=tr.lr,
                            weight_decay=tr.weight_decay, warmup_steps=tr.warmup_steps, max_steps=tr.max_steps,
                            grad_clip=tr.grad_clip, zero_stage=cfg.backend.get("zero_stage", 0),
                            bf16=cfg.backend.get("bf16", False), options=cfg.backend, seed=tr.seed)
    plugins = [instantiate_plugin(group, cfg[group]) for group in PLUGIN_GROUPS if cfg.get(group)]
    flex = DataFlex(domains.train, tr.global_batch_size, plugins, backend.interface, seed=tr.seed,
                    rank=backend.data_parallel_rank, world_size=backend.data_parallel_size,   # Megatron: the data-parallel ones
                    probe_batch_size=tr.probe_batch_size, check_ranks_every=tr.check_ranks_every,
                    loss_reduction=tr.loss_reduction, nonfinite=tr.nonfinite, datasets={"val": val, "target": domains.target},
                    optimizer=getattr(backend, "optimizer", None), tokenizer=domains.tokenizer,
                    packing=packing_for(cfg))
    check_plugin_needs([g for g in PLUGIN_GROUPS if cfg.get(g)], plugins, flex.state.domains, flex.datasets)

    strategy = run_strategy(cfg, hc, ckpt, PLUGIN_GROUPS)
    wandb_id = checkpoint_info(Path(tr.resume)).get("wandb_id") if tr.resume else None   # continue its W&B run
    out = RunOutputs(run_dir, enabled=rank == 0, flush_every=tr.ledger_flush_every,
                     wandb_run=start_wandb(cfg, run_dir, strategy, wandb_id) if rank == 0 else None)
    out.write_config(OmegaConf.to_container(cfg, resolve=True))
    out.track_samples(flex.data.describe(), partial(sample_table, flex.data))
    before = {"tokens": 0, "wall_time_s": 0.0}    # what the run did before its checkpoint (a resume)
    if tr.resume:
        client = backend.load(Path(tr.resume))
        flex.load_state_dict(client["flex"])
        torch.set_rng_state(client["rng"])
        before = client.get("run", before)
        first_val = before.get("val_loss_initial", {})
        flex.state.val_loss = dict(before.get("val_loss_state", {}))
        if rank == 0:       # said at once, before the first step
            print(f"resumed from step {flex.step} (checkpoint {Path(tr.resume).resolve()})", flush=True)
    else:
        first_val = flex.evaluate(val) if val else {}
        if first_val:
            out.log(eval_record(flex, flex.step, first_val, tr.max_val_samples))

    def run_totals():    # a collective (every rank calls it): the whole run's tokens and wall time so far
        return {"tokens": before["tokens"] + int(dist.all_gather_cat(torch.tensor([tokens])).sum()),
                "wall_time_s": before["wall_time_s"] + time.time() - started}
    def checkpoint(done):
        out.flush()                 # records up to the checkpoint are on disk before it counts
        run = dict(run_totals(), val_loss_initial=first_val, val_loss_state=dict(flex.state.val_loss))
        save_checkpoint(backend, run_dir / "checkpoints" / f"step_{done:07d}", done,
                        {"flex": flex.state_dict(), "rng": torch.get_rng_state(), "run": run}, strategy,
                        wandb_id=getattr(out.wandb, "id", None))
    tokens = 0
    stop = PoliteStop.install()     # SIGTERM / Ctrl-C: finish the step, save, record, exit 143 / 130
    progress = tqdm(range(flex.step, tr.max_steps), desc="train", disable=rank != 0, initial=flex.step,
                    total=tr.max_steps, dynamic_ncols=True)
    for step in progress:
        fault("step", step)             # tests: DATAFLEX_FAULT=step:N kills the run inside step N
        batch = backend.to_device(flex.next_batch())
        if hasattr(backend, "forward_backward"):   # Megatron: its schedule runs both, flex.loss inside its loss_func
            loss = backend.forward_backward(batch, flex.loss)
        else:
            loss = flex.loss(backend.forward(batch, lean=tr.get("lean_loss", True)), batch)
        if not flex.skip_step:          # trainer.nonfinite=skip: a step with a NaN/inf loss is dropped
            backend.step(loss)
        record = flex.end_step()
        out.log(record)
        progress.set_postfix(loss=f"{record['train_loss']:.3f}")
        tokens += int(batch["loss_mask"].sum())
        done = step + 1
        if val and (done % tr.eval_every == 0 or done == tr.max_steps):
            out.log(eval_record(flex, done, flex.evaluate(val), tr.max_val_samples))
        if tr.checkpoint_every and done % tr.checkpoint_every == 0:
            checkpoint(done)
        if done < tr.max_steps and stop.should_stop():
            if tr.checkpoint_every and tr.get("checkpoint_on_signal", True) and done % tr.checkpoint_every:
                checkpoint(done)
            break

    for name, content in (flex.finish() if not stop.requested else {}).items():   # e.g. DoReMi's mixture.json
        if rank == 0:
            (run_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    totals = run_totals()
    summary = {"strategy": strategy, "steps": flex.step, "tokens": totals["tokens"], "wall_time_s": totals["wall_time_s"],
               "val_loss_initial": first_val, "val_loss": out.last("val_loss"),
               "domain_weights": out.last("domain_weights"), "token_share": flex.token_shares(),   # target vs achieved
               "world_size": world, "backend": cfg.backend.name, "run_dir": str(run_dir),
               "host": platform.node()}    # the results page compares wall times only of runs made alike
    if out.last("target_loss") is not None:     # a data config with a `target`: its loss at the last evaluation
        summary["target_loss"] = out.last("target_loss")
    if stop.requested:
        summary["interrupted"] = stop.record(flex.step, tr.max_steps, run_dir, tr.checkpoint_every)
    out.finish(summary, plot=tr.plot and not stop.requested)
    stop.exit_if_requested(flex.step)
    if rank == 0:
        print_comparison(summary)
    if made_group and world > 1:    # ranks exit together (a rank leaving a live gloo group can abort)
        dist.leave_group()
    return summary["val_loss"] and sum(summary["val_loss"].values()) / len(summary["val_loss"])


def packing_for(cfg) -> bool:
    """trainer.packing (every back end: Megatron-core through an explicit block-diagonal mask on its local layer
    spec, or its THD packed sequences with backend.transformer_engine=true)."""
    return bool(cfg.trainer.get("packing", False))


def eval_record(flex, step: int, val_loss: dict, limit: int | None) -> dict:
    """One evaluation's metrics line: per-domain validation loss, and the target set's loss when there is one
    (over at most `limit` samples per subtask, like the validation sets)."""
    record = {"step": step, "val_loss": val_loss}
    target = flex.target_loss(limit)
    if target:     # the mean over the target's subtasks, and each one's when it has several
        record["target_loss"] = sum(target.values()) / len(target)
        if len(target) > 1:
            record["target_loss_by_task"] = target
    return record


def save_checkpoint(backend, path: Path, step: int, client: dict, strategy: dict | None = None,
                    wandb_id: str | None = None) -> None:
    """Atomic: the back end writes into `step_N.tmp`, rank 0 marks it complete and renames it to `step_N`
    (DeepSpeed's `latest` is written after that); a kill at any point leaves the previous checkpoints
    intact and at most a `.tmp` folder that resume skips and the next save replaces."""
    import shutil

    tmp = path.with_name(path.name + TMP_SUFFIX)
    writer = dist.rank() == 0

    def barrier():      # every process of the job (Megatron's tensor/pipeline ranks too), not only a group
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier(**({"device_ids": [torch.cuda.current_device()]}
                                         if torch.cuda.is_available() else {}))

    if writer and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    try:
        backend.save(tmp, client)
    except (OSError, RuntimeError) as e:
        raise_if_disk_full(e, tmp, path)
        raise
    barrier()
    if writer:
        fault("checkpoint", step)       # tests: DATAFLEX_FAULT=checkpoint:N kills the run mid-save
        try:
            mark_complete(tmp, step, strategy=strategy, **({"wandb_id": wandb_id} if wandb_id else {}))
        except OSError as e:
            raise_if_disk_full(e, tmp, path)
            raise
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        if getattr(backend, "name", "") == "deepspeed":
            latest = path.parent / "latest.tmp"
            latest.write_text(path.name)
            os.replace(latest, path.parent / "latest")
    barrier()


def raise_if_disk_full(exc: BaseException, tmp: Path, path: Path) -> None:
    """A checkpoint that ran out of disk: its partial `.tmp` folder removed, and one line naming the disk and
    the path (not the C++ writer's traceback); the previous checkpoints are intact."""
    import shutil

    from dataflex.utils.files import disk_full

    full = disk_full(exc, getattr(exc, "filename", None) or tmp)
    if full is None:
        return
    shutil.rmtree(tmp, ignore_errors=True)
    raise RunError(f"{full}, while saving checkpoint {path.name}: its partial folder was removed and the earlier "
                   f"checkpoints in {path.parent} are intact; free space, then continue with trainer.resume=latest"
                   ) from None


if __name__ == "__main__":
    main()
