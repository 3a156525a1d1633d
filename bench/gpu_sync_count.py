"""Host synchronisations of one training step, counted on CUDA with torch.cuda.set_sync_debug_mode("warn").

TinyGPT on the GPU, batches from DataFlex (built on the host), one warm-up step, then the counted steps:
the plain loop (forward, loss, backward, optimizer) and the same with DataFlex (no plugin, then each
family). Prints one JSON line: {"plain": n, "dataflex": n, "bandit": n, ...} syncs per step.

    python bench/gpu_sync_count.py       # needs CUDA; exits 0 with {"skipped": ...} without one
"""
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def count(fn, steps=3) -> float:
    fn()                                       # warm-up (allocations, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def main():
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    from conftest import TINY, synthetic_domains

    from dataflex.core.loss import per_sample_loss
    from dataflex.grad.interface import TorchInterface
    from dataflex.mixers import BanditMixer
    from dataflex.reweighters import LossReweighter
    from dataflex.selectors import LossSelector
    from dataflex.session import DataFlex
    from dataflex.models.tiny_gpt import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(**TINY).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    iface = TorchInterface(model)
    out = {}
    fixed = {k: v.cuda() for k, v in DataFlex(synthetic_domains(32), 16, seed=0).next_batch().items()}

    def plain():
        logits = model(fixed["input_ids"], position_ids=fixed["position_ids"])
        loss = per_sample_loss(logits, fixed["labels"], fixed["loss_mask"]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["plain"] = count(plain)
    for name, plugins in (("dataflex", []), ("bandit", [BanditMixer()]), ("loss_selector", [LossSelector(0.5)]),
                          ("loss_reweighter", [LossReweighter(burnout_steps=0)])):
        flex = DataFlex(synthetic_domains(32), 16, plugins=plugins, interface=iface, seed=0)

        def step():
            batch = iface.to_device(flex.next_batch())
            flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            flex.end_step()
        out[name] = count(step)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
