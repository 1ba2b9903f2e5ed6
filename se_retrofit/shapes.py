"""Shape propagation: run a traced graph on real inputs and record every tensor's shape.

Modelled on ``torch.fx.passes.shape_prop.ShapeProp``, but it stores only the shape, under a
key of our own, and tolerates nodes that produce tuples or non-tensors.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

SHAPE = "shape"


class ShapeRecorder(fx.Interpreter):
    """Runs ``graph`` over ``module`` and writes ``node.meta[key]`` with each tensor result's shape.

    Example:
        >>> import torch, torchvision
        >>> from se_retrofit.tracing import trace
        >>> model = torchvision.models.resnet18().eval()
        >>> graph = trace(model)
        >>> _ = ShapeRecorder(model, graph).run(torch.randn(1, 3, 64, 64))
        >>> [n.meta["shape"] for n in graph.nodes if n.op == "output"]
        [(1, 1000)]
    """

    def __init__(self, module: nn.Module, graph: fx.Graph, key: str = SHAPE):
        super().__init__(module, graph=graph, garbage_collect_values=True)
        self.key = key

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta[self.key] = _shape_of(result)
        return result


def _shape_of(value: Any):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return None


def record_shapes(module: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict | None = None,
                  key: str = SHAPE) -> None:
    """Propagate ``args``/``kwargs`` through ``graph`` without autograd, writing shapes under ``key``."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = _bind(placeholders, args, kwargs or {})
    with torch.no_grad():
        ShapeRecorder(module, graph, key).run(*values)


def _bind(placeholders: list[fx.Node], args: tuple, kwargs: dict) -> list:
    values = list(args)
    for node in placeholders[len(values):]:
        name = node.target.lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])
        else:
            values.append(None)
    return values[: len(placeholders)]
