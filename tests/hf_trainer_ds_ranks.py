"""One DataFlexTrainer run under Trainer's DeepSpeed ZeRO-3 with the gradient-norm selector, as torchrun's ranks
(or one process) run it. Used by tests/test_hf_trainer_deepspeed.py: `python tests/hf_trainer_ds_ranks.py OUT`
or `torchrun --nproc_per_node=2 ... OUT`. The model is built before TrainingArguments: after it, transformers
builds it already partitioned (zero.Init), from the batch sizes of the arguments alone."""
import gc
import sys

import torch

torch.set_num_threads(1)

from conftest import synthetic_domains  # noqa: E402
from hf_trainer_resume import deepspeed_on_cpu, zero_config  # noqa: E402
from test_hf import tiny_model  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import dataflex  # noqa: E402
from dataflex.backends.base import ensure_process_env  # noqa: E402
from dataflex.integrations.hf_trainer import DataFlexTrainer  # noqa: E402
from dataflex.selectors import GradNormSelector  # noqa: E402
from dataflex.utils import dist  # noqa: E402

deepspeed_on_cpu()
ensure_process_env()             # one process without a launcher: a group of one
out = sys.argv[1]
flex = dataflex.DataFlex(synthetic_domains(16), global_batch_size=8, seed=1,
                         plugins=[GradNormSelector(keep_fraction=0.5)])
model = tiny_model("llama", vocab=64, seed=4)
args = TrainingArguments(output_dir=out, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[],
                         save_strategy="no", disable_tqdm=True, seed=0, deepspeed=zero_config(3))
trainer = DataFlexTrainer(model=model, args=args, flex=flex)
trainer.train()
print(f"rank {dist.rank()} of {dist.world_size()}: flex rank {flex.rank} of {flex.world_size}, zero stage "
      f"{trainer.model_wrapped.zero_optimization_stage()}", flush=True)
del trainer, model      # the engine holds the groups: freed now, not in the interpreter's teardown (hf_trainer_ranks.py)
gc.collect()
dist.leave_group()
