"""One DataFlexTrainer run, as torchrun's ranks (or one process) run it: DataFlex built BEFORE TrainingArguments
(the README's order), so the process group does not exist yet when DataFlex is made. Used by
tests/test_hf_trainer.py: `python tests/hf_trainer_ranks.py OUT` or `torchrun --nproc_per_node=2 ... OUT`."""
import gc
import os
import sys

import torch

torch.set_num_threads(1)

from conftest import synthetic_domains  # noqa: E402
from test_hf import tiny_model  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import dataflex  # noqa: E402
from dataflex.integrations.hf_trainer import DataFlexTrainer  # noqa: E402
from dataflex.mixers import BanditMixer  # noqa: E402
from dataflex.reweighters import LossReweighter  # noqa: E402
from dataflex.utils import dist  # noqa: E402

out = sys.argv[1]
world = int(os.environ.get("WORLD_SIZE", "1"))
flex = dataflex.DataFlex(synthetic_domains(16), global_batch_size=8, seed=0,
                         plugins=[BanditMixer(), LossReweighter(burnout_steps=0)])
args = TrainingArguments(output_dir=out, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[],
                         save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, per_device_train_batch_size=8 // world,
                         **({"ddp_backend": "gloo"} if world > 1 else {}))
model = tiny_model("llama", vocab=64, seed=2)
trainer = DataFlexTrainer(model=model, args=args, flex=flex)
trainer.train()
print(f"rank {dist.rank()} of {dist.world_size()}: flex rank {flex.rank} of {flex.world_size}", flush=True)
if dist.rank() == 0:
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{out}/params.pt")
# DDP's reducer holds the gloo group: freed now, not in the interpreter's teardown, where gloo's worker threads
# freeing tensors abort the process ("terminate called without an active exception": pytorch PR 179291)
del trainer, model
gc.collect()
dist.leave_group()      # ranks leave together: a rank exiting with a live gloo group can abort in its teardown
