"""One DataFlexDPOTrainer run, as torchrun's ranks (or one process) run it: two domains of preference pairs,
BanditMixer and LossReweighter, plain SGD. Used by tests/test_trl_dpo.py: `python tests/trl_dpo_ranks.py OUT`
or `torchrun --nproc_per_node=2 tests/trl_dpo_ranks.py OUT`."""
import gc
import os
import sys

import torch

torch.set_num_threads(1)

import datasets  # noqa: E402
import transformers  # noqa: E402
from test_hf import tiny_model, train_bpe  # noqa: E402
from trl import DPOConfig  # noqa: E402

from dataflex.integrations.dpo import DataFlexDPOTrainer  # noqa: E402
from dataflex.mixers import BanditMixer  # noqa: E402
from dataflex.reweighters import LossReweighter  # noqa: E402
from dataflex.utils import dist  # noqa: E402

out = sys.argv[1]
world = int(os.environ.get("WORLD_SIZE", "1"))
tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe(), eos_token="<|endoftext|>")
math = [{"prompt": f"What is {a} plus {b}?", "chosen": f" {a + b}.", "rejected": f" {a * b + 1} or so."}
        for a in range(3, 9) for b in (2, 11)]
words = ["sea", "sun", "rain", "city", "forest", "river", "road", "sky", "hill", "snow"]
chat = [{"prompt": f"Say something about the {w}.", "chosen": f" The {w} is " + "very " * (i % 3) + "nice today.",
         "rejected": f" {w}"} for i, w in enumerate(words)]
args = DPOConfig(output_dir=out, max_steps=3, optim="sgd", learning_rate=0.05, logging_steps=1, report_to=[],
                 save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, max_length=48, beta=0.5,
                 dataset_num_proc=None, per_device_train_batch_size=8 // world, bf16=False,
                 **({"ddp_backend": "gloo"} if world > 1 else {}))
trainer = DataFlexDPOTrainer(model=tiny_model("llama", vocab=len(tok), seed=1),
                             ref_model=tiny_model("llama", vocab=len(tok), seed=2).eval(), args=args,
                             processing_class=tok, train_dataset={"math": datasets.Dataset.from_list(math),
                                                                  "chat": datasets.Dataset.from_list(chat)},
                             flex=dict(global_batch_size=8, seed=3, plugins=[BanditMixer(), LossReweighter(burnout_steps=0)]))
trainer.train()
print(f"rank {dist.rank()} of {dist.world_size()}: flex rank {trainer.flex.rank} of {trainer.flex.world_size}",
      flush=True)
if dist.rank() == 0:
    torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, f"{out}/params.pt")
del trainer             # DDP's reducer holds the gloo group: freed now, not in the interpreter's teardown (hf_trainer_ranks.py)
gc.collect()
dist.leave_group()
