"""ImageFolder data for fine-tuning: find the splits, check them, build transforms and loaders.

Two layouts are read:

* ``DIR/train/CLASS/*.jpg`` and ``DIR/val/CLASS/*.jpg``: the given splits (``val`` may lack a class,
  never have one ``train`` lacks);
* ``DIR/CLASS/*.jpg``: one set, split per class. Within each class the images are ordered by a hash
  of their path relative to ``DIR`` and the first ``round(n * val_fraction)`` go to validation (at
  least one where the class has two or more images). The split does not depend on ``--seed``, on
  the order the files were listed in, or on the machine, and a file keeps its side when others are
  added.

Classes are the sub-folder names in sorted order (as torchvision's ImageFolder numbers them); the
images are every file with an ImageFolder extension (``.jpg``, ``.png``, …), hidden files aside.

Example:
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for c in ("cat", "dog"):
    ...     (root / c).mkdir()
    ...     for i in range(5):
    ...         Image.new("RGB", (8, 8)).save(root / c / f"{i}.png")
    >>> splits = find_splits(root, val_fraction=0.2)
    >>> splits.classes, len(splits.train), len(splits.val), splits.layout
    (['cat', 'dog'], 8, 2, 'split')
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from ..errors import RetrofitError


class DataError(RetrofitError):
    """The data directory cannot be used for ImageFolder fine-tuning."""


Sample = tuple[str, int]
VAL_CACHE_BYTES = 256 * 2 ** 20  # validation images kept transformed in memory when they fit (per process)


@dataclass(frozen=True)
class Splits:
    """Training and validation samples (path, class index) and the class names."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    layout: str  # "train/val" (given splits) or "split" (one folder, split here)

    def describe(self) -> str:
        how = "DIR/train and DIR/val" if self.layout == "train/val" else "one folder split per class"
        return (f"{len(self.classes)} classes, {len(self.train)} training and {len(self.val)} validation "
                f"images ({how})")


def find_splits(root: str | os.PathLike, *, val_fraction: float = 0.2) -> Splits:
    """Read the class folders under ``root`` (see the module docstring for the two layouts)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory (expected DIR/CLASS/IMAGE or DIR/train and DIR/val)")
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() or val_dir.is_dir():
        if not (train_dir.is_dir() and val_dir.is_dir()):
            have, lack = (train_dir, val_dir) if train_dir.is_dir() else (val_dir, train_dir)
            raise DataError(f"{have} exists but {lack} does not: give both splits, or one folder of class "
                            "folders to be split")
        classes = _class_folders(train_dir)
        val_classes = _class_folders(val_dir)
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise DataError(f"{val_dir} has class folders that {train_dir} lacks: {', '.join(extra[:5])}")
        index = {c: i for i, c in enumerate(classes)}
        return Splits(classes, _samples(train_dir, classes, index), _samples(val_dir, val_classes, index),
                      "train/val")
    classes = _class_folders(root)
    index = {c: i for i, c in enumerate(classes)}
    train, val = [], []
    for name in classes:
        files = sorted(_images(root / name), key=lambda p: _hash(p.relative_to(root)))
        take = min(len(files) - 1, max(1, round(len(files) * val_fraction))) if len(files) > 1 else 0
        val += [(str(p), index[name]) for p in files[:take]]
        train += [(str(p), index[name]) for p in files[take:]]
    if not val:
        raise DataError(f"{root}: no class has two images, so there is nothing to validate on; add images or "
                        "give DIR/train and DIR/val")
    return Splits(classes, sorted(train), sorted(val), "split")


def _class_folders(directory: Path) -> list[str]:
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{directory} has no class folders (expected {directory}/CLASS/IMAGE.jpg, one folder "
                        "per class)")
    empty = [c for c in classes if not _images(directory / c)]
    if empty:
        raise DataError(f"class folder{'s' if len(empty) > 1 else ''} {', '.join(str(directory / c) for c in empty[:5])}"
                        f" hold{'' if len(empty) > 1 else 's'} no images ({', '.join(IMG_EXTENSIONS[:4])}, …)")
    if directory.name != "val" and len(classes) < 2:
        raise DataError(f"{directory} has one class folder ({classes[0]}); classification needs at least two")
    return classes


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMG_EXTENSIONS)


def _samples(directory: Path, classes: list[str], index: dict[str, int]) -> list[Sample]:
    return [(str(p), index[c]) for c in classes for p in _images(directory / c)]


def _hash(path: Path) -> str:
    return hashlib.sha1(path.as_posix().encode()).hexdigest()


class ImageList(Dataset):
    """(path, class) samples read as RGB images, as torchvision's ImageFolder reads them.

    ``cache=True`` keeps each transformed sample after its first read and returns it again
    afterwards (only for a deterministic ``transform``: the evaluation one); with loader workers,
    each worker keeps the samples it read."""

    def __init__(self, samples: list[Sample], transform: Callable | None = None, *, cache: bool = False):
        self.samples, self.transform = samples, transform
        self.cache: dict[int, tuple[Any, int]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        item = self._read(index)
        if self.cache is not None:
            self.cache[index] = item
        return item

    def _read(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is an error, not a warning
                image = default_loader(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise DataError(f"cannot read image {path}: it is too large to decode safely ({_first_line(error)}); "
                            "remove or shrink the file") from None
        except (OSError, ValueError, SyntaxError) as error:  # PIL: unidentified, truncated or broken files
            raise DataError(f"cannot read image {path}: {type(error).__name__}: {_first_line(error)}; remove or "
                            "replace the file") from None
        except Exception as error:  # noqa: BLE001 -- another library's patch of PIL.Image.open failed on it
            opener = getattr(Image.open, "__module__", "PIL.Image")  # (ultralytics' imports pi_heif on a broken file)
            raise DataError(f"cannot read image {path}: PIL.Image.open (patched by {opener}) raised "
                            f"{type(error).__name__}: {_first_line(error)}; remove or replace the file") from None
        return (self.transform(image) if self.transform else image), target


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def worker_error_message(error: BaseException) -> str:
    """The message a dataset raised in a DataLoader worker (torch re-raises it with the worker's
    traceback inside the message: its last line is ``module.Class: message``)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name = f"{type(error).__name__}: "
    return last.split(name, 1)[1] if name in last else last


def data_config(model: nn.Module, image_size: int | None) -> dict[str, Any]:
    """Mean, std, interpolation, crop_pct and input size from timm's ``resolve_data_config``
    (ImageNet defaults for models timm knows nothing about), with ``image_size`` put in.

    Example:
        >>> import timm
        >>> data_config(timm.create_model("resnet18"), 32)["input_size"]
        (3, 32, 32)
    """
    from timm.data import resolve_data_config

    config = dict(resolve_data_config(model=model))
    if image_size is not None:
        config["input_size"] = (config["input_size"][0], image_size, image_size)
    return config


def build_transforms(config: dict[str, Any], spec) -> tuple[Callable, Callable]:
    """Training (random resized crop, flip, colour jitter) and evaluation (resize, centre crop)
    transforms, both normalised with the model's mean and std. ``spec`` is a recipe's DataSpec."""
    from timm.data import create_transform

    common = {"input_size": config["input_size"], "interpolation": config.get("interpolation", "bilinear"),
              "mean": config["mean"], "std": config["std"]}
    train = create_transform(**common, is_training=True, scale=spec.scale, hflip=spec.hflip,
                             color_jitter=spec.color_jitter or None)
    val = create_transform(**common, is_training=False, crop_pct=config.get("crop_pct"))
    return train, val


def build_loaders(splits: Splits, transforms: tuple[Callable, Callable], *, batch_size: int, workers: int,
                  seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                  image_bytes: int | None = None) -> tuple[DataLoader, DataLoader]:
    """Loaders for one process: training shuffled by a DistributedSampler (seeded; call
    ``loader.sampler.set_epoch(e)`` each epoch), validation split in interleaved shards
    ``val[rank::world_size]`` with no padding, so summed metrics count every image once, in batches
    twice the training size (no gradients to keep: fewer, larger batches evaluate faster).

    ``image_bytes``: the size of one transformed image; where this process's validation images fit
    in :data:`VAL_CACHE_BYTES`, they are decoded and transformed once, in the first epoch, and kept
    (the evaluation transform gives the same tensor every epoch; a small set was otherwise decoded
    again each epoch, a tenth of an epoch on 32-px images)."""
    train_set = ImageList(splits.train, transforms[0])
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    per_rank = len(sampler)
    common = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    # a last batch of one image breaks BatchNorm in training mode: drop it then
    train = DataLoader(train_set, batch_size=batch_size, sampler=sampler,
                       drop_last=per_rank % batch_size == 1 and per_rank > 1, **common)
    val_samples = splits.val[rank::world_size]
    cache = image_bytes is not None and len(val_samples) * image_bytes <= VAL_CACHE_BYTES
    val = DataLoader(ImageList(val_samples, transforms[1], cache=cache), batch_size=2 * batch_size,
                     shuffle=False, **common)
    if len(train) == 0:
        raise DataError(f"no training batch: {len(splits.train)} images over {world_size} processes")
    return train, val


def channels_last_input(images: torch.Tensor, enabled: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if enabled else images
