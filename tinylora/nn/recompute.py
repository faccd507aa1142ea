"""Activation checkpointing: trade compute for memory by recomputing a block in backward.

``checkpoint(fn, *args, params=...)`` runs ``fn`` without recording its graph, so none of the
block's intermediate activations stay alive until backward; only the inputs are kept. When
the gradient reaches the block, the forward runs again (with grad) from the saved inputs and
is backpropagated on the spot: gradients reach the inputs and, as leaves, every parameter in
``params``. Dropout inside replays the masks of the first run, so both runs compute the same
function. The cost is one extra forward of the block; the saving is all of its activations.
"""
from __future__ import annotations

from .. import backend
from ..tensor import Tensor, enable_grad, is_grad_enabled, make_result, no_grad
from .routing import adapter_routing, current_routing

__all__ = ["checkpoint"]


def checkpoint(fn, *args, params=()) -> Tensor:
    """fn(*args) -> Tensor, recomputed in backward. params: the trainable tensors fn uses
    (e.g. ``module.parameters()``), so the output requires grad even when no input does."""
    inputs = [a for a in args if isinstance(a, Tensor)]
    trainable = [p for p in params if p.requires_grad]
    if not is_grad_enabled() or not (trainable or any(t.requires_grad for t in inputs)):
        return fn(*args)
    masks: list = []
    routing = current_routing()            # a mixed batch's rows keep their adapters
    with no_grad(), backend.dropout_tape("record", masks):
        out = fn(*args)
    if not isinstance(out, Tensor):
        raise TypeError(f"checkpoint: fn must return one Tensor, got {type(out).__name__}")

    def backward(g):
        # the same inputs, cut from the outer graph; a fresh graph is built over them
        fresh = [Tensor._wrap(a.data, a.requires_grad) if isinstance(a, Tensor) else a for a in args]
        with enable_grad(), adapter_routing(routing), backend.dropout_tape("replay", list(masks)):
            again = fn(*fresh)
        again.backward(Tensor._wrap(g))    # parameters (leaves) get their .grad here
        return tuple(f.grad.data if f.grad is not None else None
                     for f, a in zip(fresh, args) if isinstance(a, Tensor))
    return make_result(out.data, tuple(inputs), backward, "checkpoint", tuple(inputs)) \
        if any(t.requires_grad for t in inputs) else _with_param_grads(out, backward, inputs, trainable)


def _with_param_grads(out, backward, inputs, trainable):
    """No input needs a gradient (e.g. the first block over frozen embeddings): the node still
    has to run so the parameters inside get theirs. It hangs off the trainable parameters,
    for which it returns None (their gradients were accumulated during the recomputation)."""
    def backward_params(g):
        backward(g)
        return (None,) * len(trainable)
    return make_result(out.data, tuple(trainable), backward_params, "checkpoint")
