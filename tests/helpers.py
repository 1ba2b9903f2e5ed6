"""Helpers the tests import (`from helpers import ...`): small models the tests build themselves,
trained-looking weights, output comparison, a user's attention module. Fixtures live in conftest.py."""
from __future__ import annotations

import os

import timm
import torch
import torchvision
from torch import nn

#: (source, name, residual blocks the analysis must report) — the counts the product promises.
EXPECTED_BLOCKS = [
    ("timm", "resnet18", 8), ("timm", "resnet50", 16), ("timm", "resnext50_32x4d", 16),
    ("timm", "res2net50_26w_4s", 16), ("timm", "convnext_tiny", 18), ("timm", "efficientnet_b0", 9),
    ("timm", "mobilenetv2_100", 10), ("timm", "regnety_008", 14), ("timm", "densenet121", 0),
    ("timm", "vgg16", 0), ("torchvision", "resnet50", 16), ("torchvision", "mobilenet_v3_large", 10),
]
RESIDUAL_MODELS = [(s, n, c) for s, n, c in EXPECTED_BLOCKS if c]


def make_model(source: str, name: str, **kwargs) -> nn.Module:
    """A model with random weights that look trained (see :func:`as_if_pretrained`)."""
    torch.manual_seed(0)
    if source == "timm":
        return as_if_pretrained(timm.create_model(name, **kwargs))
    return as_if_pretrained(torchvision.models.get_model(name, **kwargs))


@torch.no_grad()
def as_if_pretrained(model: nn.Module) -> nn.Module:
    """Give norms and layer scales the spread trained weights have.

    Fresh timm models zero the last BN scale of each block and start ConvNeXt's layer scale at
    1e-6, so every branch outputs ~0 and an identity check on them would prove little.
    """
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if getattr(module, "running_var", None) is not None:
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    for name, param in model.named_parameters():
        if name.endswith("gamma"):
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def small_input(batch: int = 2, size: int = 64, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(123))


def run(model: nn.Module, x: torch.Tensor, training: bool, seed: int = 7) -> torch.Tensor:
    """Forward in the given mode with a fixed seed, without touching the caller's flags afterwards."""
    model.train(training)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


class BasicBlock1d(nn.Module):
    """A ResNet basic block for 1-D signals (audio), as in torchvision's but with Conv1d."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet1d(nn.Module):
    """Three stages of two basic blocks over (N, C, L) signals: 6 residual blocks."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 16, 7, 2, 3, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.layers = nn.Sequential(
            BasicBlock1d(16, 16), BasicBlock1d(16, 16), BasicBlock1d(16, 32, 2), BasicBlock1d(32, 32),
            BasicBlock1d(32, 64, 2), BasicBlock1d(64, 64))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(-1))


def trained_attention(model: nn.Module) -> nn.Module:
    """Move the new attention weights off their identity start, as fine-tuning would."""
    import se_retrofit

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in se_retrofit.attention_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def outputs(model: nn.Module, x: torch.Tensor, training: bool = False):
    """Outputs in eval or train mode (seeded); train mode runs a copy, so batch-norm statistics stay as they were."""
    import copy

    model = copy.deepcopy(model).train() if training else model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        return model(x)


def user_attention_source(name: str, marker: bool = False) -> str:
    """The source of a user's own module registering attention type ``name`` (a learned per-channel
    scale), to write next to a test; with ``marker`` it writes a file IMPORTED beside itself when run."""
    mark = 'import pathlib\npathlib.Path(__file__).with_name("IMPORTED").write_text("this module ran")\n' if marker else ""
    return f'''
"""A user's own attention type, registered from outside se_retrofit."""
import torch
from torch import nn

import se_retrofit
{mark}

@se_retrofit.register_attention({name!r})
class ChannelScale(nn.Module):
    """Learned per-channel scale."""

    def __init__(self, channels, *, spatial_dims=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))
        self.shape = (1, channels) + (1,) * spatial_dims

    def init_identity(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        return x * self.weight.view(self.shape)
'''


def same_threads_env(**extra: str) -> dict[str, str]:
    """The environment for a child process whose numbers a test compares with this process's: torch on as
    many threads as here. A convolution summed over another number of threads differs in the last bits,
    and a library may set ``OMP_NUM_THREADS`` on import (ultralytics sets it to 1), so the inherited
    environment does not say how many threads this process computes on."""
    threads = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **extra}
