"""The gradient engine: per-sample gradients (`api.per_sample_grads`: exact through torch.func in `vmap`,
hooked in `ghost`, factored in `factored`, a loop in `fallback`), random projections (`projection`), and the
signal interface a model offers plugins (`interface.TorchInterface`). Imports `core`, `models`, `utils`."""
from dataflex.grad.api import per_sample_grads
from dataflex.grad.factored import FactoredProjector
from dataflex.grad.ghost import batch_grad, per_sample_grad_dots, per_sample_grad_norms
from dataflex.grad.interface import TorchInterface
from dataflex.grad.params import PerSampleGrads, select_params
from dataflex.grad.projection import RademacherProjector, SparseProjector

__all__ = ["FactoredProjector", "PerSampleGrads", "RademacherProjector", "SparseProjector", "TorchInterface",
           "batch_grad", "per_sample_grad_dots", "per_sample_grad_norms", "per_sample_grads", "select_params"]
