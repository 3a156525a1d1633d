"""LESS scoring offline: a pool scored against a target from a finished run's checkpoints.

    python launch/score.py RUN_DIR --target math                   # every checkpoint of RUN_DIR
    python launch/score.py RUN_DIR --target math --checkpoints step_0000020 step_0000040 --out DIR
    python launch/train.py +selector=less selector.selection=DIR/less_selection.json   # train on it

RUN_DIR is a run with `trainer.checkpoint_every` (the warm-up run: e.g. `+selector=random` or a run
on a fraction, with `model.lora_rank`); its config.yaml gives the data and model. For each
checkpoint (its parameters and Adam moments: torch back end, or DeepSpeed ZeRO 0 in fp32) the pool's
Adam features and the target's SGD features are computed as in `+selector=less`
(dataflex/selectors/less.py, the same code), written as they come to OUT/checkpoint_i_*.npy
(float16, memory-mappable, beside checkpoint_i.json: projector, seed, step, lr, betas, eps and the
rows done), with a progress bar. A crashed or killed scoring continues where it stopped when run
again with the same arguments. The checkpoints are weighted by their learning rate (the one saved
with each: LESS uses the epoch's mean), renormalised. OUT/less_selection.json holds the kept ids and
their scores; OUT/scores.npy every pool sample's score (row = sample id).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) of a torch-backend or DeepSpeed ZeRO-0 checkpoint."""
    from dataflex.utils.safeload import load_weights_only

    if (path / "state.pt").exists():
        state = load_weights_only(path / "state.pt", "checkpoint file")
        return state["model"], state["optimizer"]
    ds = path / "mp_rank_00_model_states.pt"
    if ds.exists():
        state = load_weights_only(ds, "checkpoint file")
        if state.get("optimizer") is None:
            raise ValueError(f"{path}: a DeepSpeed checkpoint without the optimizer's state in the model file "
                             "(ZeRO 1-3 or bf16 partition it): score checkpoints of backend=torch or ZeRO 0 fp32")
        return state["module"], state["optimizer"]
    raise FileNotFoundError(f"{path}: no state.pt (torch back end) or mp_rank_00_model_states.pt (DeepSpeed)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--target", nargs="+", default=["target"],
                    help="the data config's `target`, a domain (its validation set), or several (one subtask each)")
    ap.add_argument("--checkpoints", nargs="*", default=None, help="names under RUN_DIR/checkpoints (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="default RUN_DIR/less_scores")
    ap.add_argument("--keep-fraction", type=float, default=0.05)
    ap.add_argument("--params", default="lora")
    ap.add_argument("--projector", default="sparse", choices=("sparse", "rademacher", "none"))
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--projector-seed", type=int, default=0)
    ap.add_argument("--feature", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--target-samples", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=64)
    args = ap.parse_args(argv)

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from dataflex.backends import make_optimizer
    from dataflex.data.domains import MixtureDataset, load_domains
    from dataflex.grad.interface import TorchInterface
    from dataflex.selectors.less.math import aggregate, checkpoint_weights, top_fraction
    from dataflex.selectors.less.plugin import LessSelector
    from dataflex.session.flex import DataFlex

    run_dir = args.run_dir
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        print(f"score: error: {cfg_path} not found (a launch/train.py run folder)", file=sys.stderr)
        return 2
    cfg = OmegaConf.load(cfg_path)
    names = args.checkpoints or sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")
                                       if not p.name.endswith(".tmp"))     # a save killed midway
    if not names:
        print(f"score: error: no checkpoints under {run_dir / 'checkpoints'} (train with trainer.checkpoint_every)",
              file=sys.stderr)
        return 2
    out = args.out or run_dir / "less_scores"
    out.mkdir(parents=True, exist_ok=True)

    domains = load_domains(cfg.data, cfg.model.seq_len, cfg.trainer.max_val_samples)
    val = MixtureDataset(domains.val) if domains.val else None
    model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model).items()}
    model = instantiate(model_cfg, vocab_size=model_cfg.get("vocab_size") or domains.tokenizer.vocab_size,
                        seed=cfg.trainer.seed)
    tr = cfg.trainer
    optimizer, _ = make_optimizer(model, tr.lr, tr.weight_decay, tr.warmup_steps, tr.max_steps)
    flex = DataFlex(domains.train, 1, interface=TorchInterface(model), optimizer=optimizer,
                    datasets={"val": val, "target": domains.target}, world_size=1, rank=0)
    plugin = LessSelector(target=args.target, params=args.params, num_checkpoints=len(names),
                          keep_fraction=args.keep_fraction, dim=args.dim, projector=args.projector,
                          projector_seed=args.projector_seed, target_samples=args.target_samples,
                          chunk_size=args.chunk_size, feature=args.feature, features_dir=str(out))
    lrs, cosines, steps = [], [], []
    for i, name in enumerate(names):
        model_sd, opt_sd = load_checkpoint(run_dir / "checkpoints" / name)
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(opt_sd)
        lr = float(optimizer.param_groups[0]["lr"])
        step = int(name.rsplit("_", 1)[-1]) if name.rsplit("_", 1)[-1].isdigit() else i
        cosines.append(plugin.checkpoint_cosines(flex.state, i, step, lr))
        lrs.append(lr)
        steps.append(step)
    scores, per_subtask = aggregate(torch.stack(cosines), lrs)
    keep = top_fraction(scores, args.keep_fraction)
    kept = torch.nonzero(keep).flatten()
    import numpy as np
    np.save(out / "scores.npy", scores.numpy())
    np.save(out / "scores_per_subtask.npy", per_subtask.numpy())
    dom = flex.data.domain[kept]
    selection = {"sample_ids": kept.tolist(), "scores": scores[kept].tolist(),
                 "scores_per_subtask": per_subtask[kept].tolist(),
                 "kept_per_domain": {d: int((dom == k).sum()) for k, d in enumerate(flex.data.names)},
                 "keep_fraction": args.keep_fraction, "target": args.target, "subtasks": plugin.subtask_names,
                 "checkpoints": names, "checkpoint_steps": steps, "lr": lrs,
                 "checkpoint_weights": checkpoint_weights(lrs).tolist(), "projector": plugin.featurizer.describe(),
                 "feature": args.feature, "params": args.params, **plugin.optim_meta, "features_dir": str(out),
                 "run_dir": str(run_dir)}
    (out / "less_selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    print(f"scored {len(scores)} samples over {len(names)} checkpoints; kept {len(kept)}: "
          + ", ".join(f"{d} {n}" for d, n in selection["kept_per_domain"].items()))
    print(f"selection: {out / 'less_selection.json'}  (train on it: +selector=less selector.selection=PATH)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
