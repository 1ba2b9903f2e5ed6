"""Layout: where the channels (and the batch) are at a residual block's addition.

Layout is told by the layer that writes the branch where it says one (a conv or BatchNorm:
channels-first; a Linear, LayerNorm or ``nn.MultiheadAttention``: channels-last, the attention's
``batch_first`` saying where the batch is), a ``(N, C)`` sum being one vector per sample; else by
probing with a second input size: the dimensions that change are spatial, the one non-batch
dimension that does not is the channel dimension. The second probe runs only when it is needed.
Where neither says (a fixed-size model whose branch is written by a Linear over the tokens, or by
no layer), the layers that read the block input or the sum say it.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from . import op_kinds as K
from .norms import channel_count
from .recording import Op, Recording
from .residual import _Residual

CHANNELS_FIRST, CHANNELS_LAST, TOKENS, FEATURES, UNKNOWN = (
    "channels_first", "channels_last", "tokens", "features", "unknown")
SUPPORTED_LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST, TOKENS, FEATURES)


def _layout(add: Op, residual: _Residual, shapes_b: Mapping[int, tuple],
            modules: dict[str, nn.Module]) -> tuple[str, int, int]:
    """(layout, channel dim, batch dim); 0 as channel dim means unknown.

    A ``(N, C)`` sum has one candidate. Else the layer that writes the branch (:func:`_writer_says`)
    tells where its channels are: a conv of the branch that produces the sum's very shape, with a
    channel count that no spatial size shares, says channels-first (no permutation keeps that shape);
    a Linear, a LayerNorm or an ``nn.MultiheadAttention`` writing the sum says channels-last (the
    attention also where the batch is). Where none does, the two probes tell it: the dimensions that
    change are spatial. Where the second probe did not run, or the model resized it back to its own
    size (CrossViT interpolates every input to ``img_size``), or more than one dimension kept its
    size (MobileViTV2's (N, C, pixels per patch, patches)), the layers of the branch decide."""
    shape_a = add.shape
    rank = len(shape_a)
    if rank == 2:
        return FEATURES, 1, 0
    if rank < 2:
        return UNKNOWN, 0, 0
    if shape_a[1] not in shape_a[2:] and _conv_says_channels_first(residual, shape_a, modules, exact=True):
        return CHANNELS_FIRST, 1, 0
    written = _writer_says(residual, shape_a, modules)
    if written is not None:
        return written
    shape_b = shapes_b.get(add.index)
    if shape_b is not None and len(shape_b) == rank and shape_b != shape_a:
        constant = [d for d in range(1, rank) if shape_a[d] == shape_b[d]]
        if len(constant) == 1 and len(shape_a) - 2 == sum(shape_a[d] != shape_b[d] for d in range(1, rank)):
            dim = constant[0]
            if dim == 1:
                return CHANNELS_FIRST, 1, 0
            if dim == rank - 1:
                return _channels_last(rank)
        if len(constant) != 2:
            return _readers_say(add, residual, shape_a, modules) or (UNKNOWN, 0, 0)
    if _conv_says_channels_first(residual, shape_a, modules):
        return CHANNELS_FIRST, 1, 0
    if _linear_says_channels_last(residual, shape_a, modules):
        return _channels_last(rank)
    return _readers_say(add, residual, shape_a, modules) or (UNKNOWN, 0, 0)


def _channels_last(rank: int, batch_dim: int = 0) -> tuple[str, int, int]:
    return (TOKENS if rank == 3 else CHANNELS_LAST), rank - 1, batch_dim


#: ops a branch may end with after the layer that writes it: stochastic depth, dropout, activations
_AFTER_WRITER = frozenset({K.DROPOUT, K.IDENTITY, K.ACT})


def _writer_says(residual: _Residual, shape: tuple[int, ...], modules: dict[str, nn.Module]
                 ) -> tuple[str, int, int] | None:
    """The layout the layer writing the branch operand says, where it says one: walking back from
    the operand through dropout, activations, casts and a layer scale (``γ · f(x)``) to the first
    layer, that layer's output of the sum's shape carries its channels where its kind puts them.
    Through a transpose, or a crop or pad (Wav2Vec2's positional conv trims the frame its padding
    added), the channels are found again by their size (:func:`_through_permutes`)."""
    op, rank = residual.branch, len(shape)
    permuted = False  # a transpose, permute, crop or pad between the writer and the sum
    for _ in range(12):
        if op.shape is None or len(op.shape) != rank or (sorted(op.shape) != sorted(shape) and not permuted):
            return None
        if op not in residual.cone and op is not residual.branch:
            return None
        if op.shape != tuple(shape) and not permuted:
            return None
        attention = next((modules[p] for p in op.returned_by if isinstance(modules.get(p), nn.MultiheadAttention)),
                         None)
        if attention is not None:
            said = _channels_last(len(op.shape)) if attention.embed_dim == op.shape[-1] else None
            return _through_permutes(said, op.shape, shape) if permuted else said
        said = _layer_says(op, op.shape, modules)
        if said is not None or op.weights:
            return _through_permutes(said, op.shape, shape) if permuted else said
        if (op.kind == K.RESHAPE and op.name in _PERMUTES or _crops_or_pads(op)) and len(op.inputs) == 1:
            permuted, op = True, op.inputs[0]
        elif op.kind == K.MUL:  # a layer scale: follow the map it scales
            maps = [i for i in op.inputs if i.shape == op.shape]
            if len(maps) != 1:
                return None
            op = maps[0]
        elif op.kind in _AFTER_WRITER and len(op.inputs) == 1:
            op = op.inputs[0]
        else:
            return None
    return None


#: reshapes that only reorder dimensions: the channels keep their size (torchaudio's Conformer
#: convolves ``(N, C, T)`` and transposes back to ``(T, N, C)`` before its addition)
_PERMUTES = frozenset({"transpose", "permute", "swapaxes", "swapdims", "movedim", "t"})


def _crops_or_pads(op: Op) -> bool:
    """A slice (``x[:, :, :-1]``, ``narrow``) or a pad of one tensor that keeps its rank."""
    if op.kind != K.PAD and op.name not in ("__getitem__", "narrow"):
        return False
    source = op.inputs[0] if len(op.inputs) == 1 else None
    return source is not None and source.shape is not None and op.shape is not None \
        and len(source.shape) == len(op.shape)


def _through_permutes(said: tuple[str, int, int] | None, written: tuple[int, ...], shape: tuple[int, ...]
                      ) -> tuple[str, int, int] | None:
    """The layout of a sum whose branch was written as ``written`` and then had its dimensions
    reordered: the channels are where their size is, where no other dimension of the sum has it; the
    batch too (where it is not 1, a size others can share). A layer writing on the last dimension (a
    Linear) moved off the sum's last dimension mixed something else than channels (MLP-Mixer's token
    mixing: a Linear over the tokens, transposed back): it says nothing of the sum."""
    if said is None:
        return None
    channels = written[said[1]]
    if list(shape).count(channels) != 1:
        return None
    channel_dim = shape.index(channels)
    batch = written[said[2]]
    batch_dim = shape.index(batch) if list(shape).count(batch) == 1 else 0
    rank = len(shape)
    if said[1] == len(written) - 1 and channel_dim != rank - 1:
        return None
    if channel_dim == 1 and batch_dim == 0:
        return CHANNELS_FIRST, 1, 0
    if channel_dim == rank - 1:
        return _channels_last(rank, batch_dim)
    return None


def _layer_says(op: Op, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> tuple[str, int, int] | None:
    """Where this layer writes its channels: a Linear's ``out_features``, a one-dimensional
    LayerNorm's ``normalized_shape`` or a functional linear map on the last dimension; a conv's
    ``out_channels`` or a BatchNorm's / GroupNorm's channels on dimension 1."""
    rank = len(shape)
    layer = modules.get(op.module) if op.module else None
    if isinstance(layer, nn.Linear) and layer.out_features == shape[-1]:
        return _channels_last(rank)
    if isinstance(layer, nn.LayerNorm) and tuple(layer.normalized_shape) == (shape[-1],):
        return _channels_last(rank)
    if not op.module and op.kind == K.LINEAR and op.weights and op.name in _LINEAR_MAPS:
        return _channels_last(rank)
    if isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        channels = layer.out_channels if rank == len(layer.kernel_size) + 2 else None
    else:
        channels = _norm_channels(layer)
    return (CHANNELS_FIRST, 1, 0) if channels is not None and channels == shape[1] else None


def _norm_channels(layer: nn.Module | None) -> int | None:
    """The channels a BatchNorm or GroupNorm normalises (on dimension 1); None for other layers."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return layer.num_features
    return layer.num_channels if isinstance(layer, nn.GroupNorm) else None


def _readers_say(add: Op, residual: _Residual, shape: tuple[int, ...], modules: dict[str, nn.Module]
                 ) -> tuple[str, int, int] | None:
    """Where no layer of the branch says it and no probe could: the layers that read the block input
    or the sum as they are (no reshape between), where they all agree. A LayerNorm over the last
    dimension or a Linear reading it says channels-last; a conv or BatchNorm/GroupNorm reading
    dimension 1 says channels-first (MLP-Mixer's token-mixing block, written by a Linear over the
    tokens, reads its input through a LayerNorm over the channels, and so does the next block its sum;
    EfficientFormer's pooling mixer ``x + γ·(pool(x) − x)`` has no layer, the conv after it does)."""
    said = {_reader_says(op, shape, modules) for source in (residual.block_input, add)
            for op in source.users if op is not add and op.module}
    said.discard(None)
    return said.pop() if len(said) == 1 else None


def _reader_says(op: Op, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> tuple[str, int, int] | None:
    """Where the layer ``op`` reads its input's channels, for an input of ``shape``; None where it
    reads no channels (a pooling, an activation) or its sizes fit neither place."""
    rank, layer = len(shape), modules.get(op.module)
    if isinstance(layer, nn.LayerNorm) and tuple(layer.normalized_shape) == (shape[-1],) \
            or isinstance(layer, nn.Linear) and layer.in_features == shape[-1]:
        return _channels_last(rank)
    if isinstance(layer, nn.modules.conv._ConvNd) and rank == len(layer.kernel_size) + 2:
        channels = layer.in_channels
    else:
        channels = _norm_channels(layer)
    if channels is None:
        return _affine_norm_says(layer, shape) if op.kind == K.NORM else None
    return (CHANNELS_FIRST, 1, 0) if channels == shape[1] else None


def _affine_norm_says(layer: nn.Module, shape: tuple[int, ...]) -> tuple[str, int, int] | None:
    """A norm told by what it computes (:mod:`.norms`: ResMLP's ``Affine``, a frozen BatchNorm): its
    per-channel tensors broadcast against the input put the channels where their one size is."""
    channels, rank = channel_count(layer), len(shape)
    tensors = [t for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)) if t.numel() == channels]
    if not channels or not tensors:
        return None
    dims = {rank - tensors[0].dim() + d for d, size in enumerate(tensors[0].shape) if size == channels}
    if dims == {1} and shape[1] == channels:
        return CHANNELS_FIRST, 1, 0
    return _channels_last(rank) if dims == {rank - 1} and shape[-1] == channels else None


#: functional maps that write the last dimension (``F.linear``; transformers' ``Conv1D`` as ``addmm``)
_LINEAR_MAPS = frozenset({"linear", "addmm"})


def _linear_says_channels_last(residual: _Residual, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> bool:
    """Without a second probe: the branch has a Linear producing the last dimension, or a linear map
    with parameters doing so (transformers' ``Conv1D``: ``addmm(bias, x, weight)``); the conv check
    runs first (tokens in ViTs and GPTs, NHWC maps in Swin)."""
    for op in residual.cone:
        layer = modules.get(op.module) if op.module else None
        if isinstance(layer, nn.Linear) and layer.out_features == shape[-1] and (op.shape or ())[-1:] == shape[-1:]:
            return True
        if not op.module and op.kind == K.LINEAR and op.weights and (op.shape or ())[-1:] == shape[-1:]:
            return True
    return False


def _conv_says_channels_first(residual: _Residual, shape: tuple[int, ...], modules: dict[str, nn.Module],
                              exact: bool = False) -> bool:
    """A conv in the branch producing this channel count and rank (with ``exact``: this very shape)."""
    for op in residual.cone:
        conv = modules.get(op.module) if op.module else None
        if isinstance(conv, nn.modules.conv._ConvNd) and conv.out_channels == shape[1] \
                and len(shape) == len(conv.kernel_size) + 2 and (not exact or op.shape == tuple(shape)):
            return True
    return False


def _sequence_first(recording: Recording, modules: dict[str, nn.Module]) -> set[Op]:
    """The ops whose result holds sequence-first tokens ``(L, N, C)``: the outputs and the inputs of
    the ``nn.MultiheadAttention`` layers with ``batch_first=False``, what is computed from them and
    what they are computed from without a reshape or a change of rank (the sums, norms and
    feed-forward layers around them: torchaudio's Conformer adds its first half-step feed-forward
    layer before any attention ran, on tokens its model transposed to sequence-first)."""
    def sequence_first(module: str) -> bool:
        return isinstance(modules.get(module), nn.MultiheadAttention) and not modules[module].batch_first

    seeds = [op for op in recording.ops if op.shape and len(op.shape) == 3 and any(map(sequence_first, op.returned_by))]
    seeds += [i for op in recording.ops if op.module and sequence_first(op.module)
              for i in op.inputs if i.shape and len(i.shape) == 3]
    found, stack = set(), seeds
    while stack:
        op = stack.pop()
        if op in found:
            continue
        found.add(op)
        near = [*op.users, *(op.inputs if op.kind != K.RESHAPE else ())]
        stack.extend(n for n in near if n.kind != K.RESHAPE and n.shape and len(n.shape) == 3
                     and n.shape[:2] == op.shape[:2])
    return found
