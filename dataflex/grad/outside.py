"""Uses of a hooked parameter outside its module, found in the autograd graph.

The hook engine (`dataflex.grad.ghost`) sees a parameter's use only through its module's hooked calls. A
parameter also used outside them (a tied head written `F.linear(h, emb.weight)`, `emb.weight[ids]`,
`mod.forward(x)` called past the hooks) would lose that use silently. After the forward, `outside_uses` walks
the graph from the loss: every edge into a chosen parameter that lies outside the subgraph of one of its own
module's hooked calls (from the call's output back to its input) names that parameter, which the engine then
sends to the exact path (reported in `fallback`, with `warn_outside`'s one-time warning). The walk sees whatever
autograd records (custom Functions, C++ ops) and costs one pass over the graph's nodes, no gradient.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
from torch import nn


def _accumulators(node) -> Optional[int]:
    """id of the leaf tensor an AccumulateGrad node feeds, else None."""
    variable = getattr(node, "variable", None)
    return id(variable) if variable is not None else None


def _leaf_edges(start, stop, keep: list):
    """(id of node, k, id of leaf) for every edge k of a node into a leaf tensor (its AccumulateGrad), walking
    back from `start` and not past `stop`; the nodes walked go into `keep` (alive while their ids are compared)."""
    stack, seen = [start] if start is not None else [], set()
    while stack:
        node = stack.pop()
        if id(node) in seen or node is stop:
            continue
        seen.add(id(node))
        keep.append(node)
        for k, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            leaf = _accumulators(child)
            if leaf is None:
                stack.append(child)
            else:
                yield id(node), k, leaf


def outside_uses(loss: torch.Tensor, records: list, chosen: dict) -> set:
    """Names of chosen parameters that reach `loss` through an autograd edge that no hooked call
    accounts for. A call's own edges are those into the call's own parameters found walking back
    from its output, stopping at the node of its input; every other edge into a chosen parameter
    (found walking back from the loss) is a use the hooks never see."""
    if loss.grad_fn is None:
        return set()
    wanted = {id(p): n for n, p in chosen.items()}
    keep, own_edges = [], set()
    for mod, roles, _, out, input_node in records:
        own = {id(mod._parameters[r]) for r in roles}
        own_edges |= {(n, k) for n, k, leaf in _leaf_edges(out.grad_fn, input_node, keep) if leaf in own}
    return {wanted[leaf] for n, k, leaf in _leaf_edges(loss.grad_fn, None, keep)
            if leaf in wanted and (n, k) not in own_edges}


_warned: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def warn_outside(module: nn.Module, names: set) -> None:
    """Once per module and set of names."""
    key, seen = tuple(sorted(names)), _warned.setdefault(module, set())
    if key not in seen:
        seen.add(key)
        warnings.warn(f"gradient engine: {sorted(names)[:4]} of {type(module).__name__} are also used outside their "
                      "modules (a tied head written F.linear(h, emb.weight), emb.weight[ids], ...): their per-sample "
                      "gradients come from the exact path (torch.func), which materialises them", stacklevel=3)
