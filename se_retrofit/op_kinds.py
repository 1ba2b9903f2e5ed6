"""What kind of operation an fx node performs: the vocabulary the residual criterion speaks."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _MaxPoolNd,
)

CONV, LINEAR, NORM, NORM_ACT, POOL, IDENTITY, DROPOUT, PAD, ACT, ADD, MUL, RESHAPE, UPSAMPLE, CAT, OTHER = (
    "conv", "linear", "norm", "norm_act", "pool", "identity", "dropout", "pad", "act", "add", "mul",
    "reshape", "upsample", "cat", "other",
)
#: kinds a shortcut projection may consist of (downsample conv/BN, pooling, padding, reshapes, no-ops)
PROJECTION_KINDS = frozenset({CONV, NORM, POOL, IDENTITY, DROPOUT, PAD, RESHAPE})
#: kinds that apply a learned layer when they carry parameters (elementwise scales and shifts do not)
LAYER_KINDS = frozenset({CONV, LINEAR, NORM, NORM_ACT})
#: kinds that only regularise or pass through: the standard position sits before them
PASSTHROUGH_KINDS = frozenset({IDENTITY, DROPOUT})

_MODULE_KINDS: list[tuple[tuple[type, ...], str]] = [
    ((nn.modules.conv._ConvTransposeNd, nn.Upsample, nn.PixelShuffle), UPSAMPLE),
    ((_ConvNd,), CONV),
    ((nn.Linear,), LINEAR),
    ((_BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm, nn.LocalResponseNorm), NORM),
    ((_AvgPoolNd, _MaxPoolNd, _AdaptiveAvgPoolNd, _AdaptiveMaxPoolNd), POOL),
    ((nn.Identity,), IDENTITY),
    ((_DropoutNd,), DROPOUT),
    ((nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
      nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh), ACT),
]
# Module classes from other libraries recognised by name (stochastic depth and activations).
_MODULE_NAME_KINDS = {
    "DropPath": DROPOUT, "StochasticDepth": DROPOUT, "DropBlock2d": DROPOUT,
    "Swish": ACT, "SwishMe": ACT, "Mish": ACT, "MishMe": ACT, "HardSwish": ACT, "HardSwishMe": ACT,
    "HardMish": ACT, "HardMishMe": ACT, "GELU": ACT, "GELUTanh": ACT, "QuickGELU": ACT,
    # timm's EvoNorms normalise and activate in one layer
    **dict.fromkeys(("EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dB2", "EvoNorm2dS0", "EvoNorm2dS0a", "EvoNorm2dS1",
                     "EvoNorm2dS1a", "EvoNorm2dS2", "EvoNorm2dS2a"), NORM_ACT),
}

_FUNCTION_KINDS = {
    F.conv1d: CONV, F.conv2d: CONV, F.conv3d: CONV, torch.conv1d: CONV, torch.conv2d: CONV,
    torch.conv3d: CONV, F.linear: LINEAR,
    F.batch_norm: NORM, F.layer_norm: NORM, F.group_norm: NORM, F.instance_norm: NORM,
    torch.batch_norm: NORM,
    F.avg_pool1d: POOL, F.avg_pool2d: POOL, F.avg_pool3d: POOL, F.max_pool1d: POOL,
    F.max_pool2d: POOL, F.max_pool3d: POOL, F.adaptive_avg_pool1d: POOL,
    F.adaptive_avg_pool2d: POOL, F.adaptive_avg_pool3d: POOL, F.adaptive_max_pool2d: POOL,
    F.dropout: DROPOUT, F.dropout1d: DROPOUT, F.dropout2d: DROPOUT, F.dropout3d: DROPOUT,
    F.pad: PAD,
    F.relu: ACT, F.relu6: ACT, F.silu: ACT, F.gelu: ACT, F.hardswish: ACT, F.hardsigmoid: ACT,
    F.leaky_relu: ACT, F.elu: ACT, F.mish: ACT, torch.relu: ACT, torch.relu_: ACT,
    torch.sigmoid: ACT, torch.tanh: ACT, F.sigmoid: ACT, F.tanh: ACT,
    operator.add: ADD, operator.iadd: ADD, torch.add: ADD,
    operator.mul: MUL, operator.imul: MUL, torch.mul: MUL,
    torch.cat: CAT, torch.concat: CAT, torch.concatenate: CAT,
}
_METHOD_KINDS = {
    "add": ADD, "add_": ADD, "mul": MUL, "mul_": MUL,
    "relu": ACT, "relu_": ACT, "sigmoid": ACT, "sigmoid_": ACT, "tanh": ACT,
    "contiguous": IDENTITY, "clone": IDENTITY,
}


def module_kind(module: nn.Module) -> str:
    """The kind of a module; a norm that carries its own activation (timm's BatchNormAct2d) is
    ``norm_act``, which is no projection."""
    kind = _base_module_kind(module)
    if kind == NORM and any(_base_module_kind(m) == ACT for m in module.children()):
        return NORM_ACT
    return kind


def _base_module_kind(module: nn.Module) -> str:
    for types, kind in _MODULE_KINDS:
        if isinstance(module, types):
            return kind
    return _MODULE_NAME_KINDS.get(type(module).__name__, OTHER)


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The kind of operation ``node`` performs (one of the constants above)."""
    if node.op == "call_module":
        return module_kind(modules[node.target])
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target, OTHER)
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, OTHER)
    return OTHER


def has_weights(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True where the node applies learned parameters (a module with parameters, or a get_attr input)."""
    if node.op == "call_module":
        return any(True for _ in modules[node.target].parameters())
    return any(arg.op == "get_attr" for arg in node.all_input_nodes)


_NAME_KINDS = {
    **dict.fromkeys(("add", "add_", "__add__", "__iadd__", "__radd__"), ADD),
    **dict.fromkeys(("mul", "mul_", "__mul__", "__imul__", "__rmul__"), MUL),
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_tbc"), CONV),
    **dict.fromkeys(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "interpolate", "upsample",
                     "upsample_nearest", "upsample_bilinear", "pixel_shuffle", "repeat_interleave"), UPSAMPLE),
    **dict.fromkeys(("linear", "matmul", "mm", "bmm", "einsum", "addmm", "baddbmm", "__matmul__",
                     "bilinear", "multi_head_attention_forward"), LINEAR),
    **dict.fromkeys(("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
                     "local_response_norm"), NORM),
    **dict.fromkeys(("avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
                     "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                     "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool2d"), POOL),
    **dict.fromkeys(("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"),
                    DROPOUT),
    "pad": PAD,
    **dict.fromkeys(("cat", "concat", "concatenate"), CAT),
    **dict.fromkeys(("relu", "relu_", "relu6", "silu", "gelu", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_",
                     "tanh", "tanh_", "leaky_relu", "elu", "mish", "softplus", "hardtanh", "selu", "celu",
                     "prelu"), ACT),
    **dict.fromkeys(("contiguous", "clone", "detach", "to", "type_as", "float"), IDENTITY),
    **dict.fromkeys(("view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze", "unsqueeze",
                     "movedim", "view_as", "reshape_as"), RESHAPE),
}


def function_kind(func) -> str:
    """The kind of a torch function or Tensor method as a ``TorchFunctionMode`` sees it, by name
    (``x + y`` arrives as ``Tensor.add``, ``out += y`` as ``Tensor.add_``)."""
    return _NAME_KINDS.get(getattr(func, "__name__", ""), OTHER)
