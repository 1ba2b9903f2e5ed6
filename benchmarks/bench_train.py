"""Training cost of an edited model, side by side with timm's native one and with timm's trainer.

1. **One optimiser step** (forward, backward, SGD step) of the edited ``resnet50`` (SE at the
   standard position, r=16, through ``se_retrofit.retrofit``) against timm's native ``seresnet50``
   (the same SE modules, built by timm), batch 8 at 224x224, in one process, interleaved: each round
   times one step of each, after warm-up steps. Reported: min and median of each, the ratios
   edited / native of the minima and of the medians (goal: at most 1.03), and the spread of the
   per-round ratios (min, median, max).
   Peak memory of a step: on CPU, each repeat runs in a fresh process per model (interleaved) and
   reports the peak resident set size during two steps above the RSS after building the model (peak
   RSS from ``getrusage``); on a GPU, ``torch.cuda.max_memory_allocated`` of a step above the memory
   held before it. Goal: at most 1.02.
2. **The fine-tuning loop's images/s against timm's train.py**, on the same edited model and data
   (an ImageFolder of PNG files): ``se_retrofit.finetune.trainer.train_epoch`` with the product's
   loaders, transforms, optimiser groups (``start_phase``) and per-step scheduler, against a faithful
   replica of the inner loop of timm's ``train.py`` (``train_one_epoch``; huggingface/pytorch-image-models,
   Apache-2.0: ``model.train()``; per batch: channels-last where asked, forward and loss under the
   (no-op on CPU) autocast, ``loss.item()`` into an average meter, ``optimizer.zero_grad()``,
   ``loss.backward()``, ``optimizer.step()``, ``lr_scheduler.step_update(num_updates)``; the loader from
   ``timm.data.create_dataset`` + ``create_loader``, the optimiser from ``timm.optim.create_optimizer_v2``,
   the schedule ``timm.scheduler.CosineLRScheduler``). Its code is not vendored here: train.py is not
   in timm's pip package, and the loop is a dozen lines. Epochs alternate between the two after one
   warm-up epoch each; reported: images/s (min, median, max over epochs), ratio of the medians and of
   the best epochs (goal: at least 0.95), and the per-pair ratios' spread.

    python benchmarks/bench_train.py                           # both parts (CPU: about 5 minutes)
    python benchmarks/bench_train.py --quick                   # smoke run: resnet18 at 64 px, few repeats
    python benchmarks/bench_train.py --json benchmarks/results/bench_train.json

It exits 0 whether or not a goal is met. Compare figures only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --- the two models -------------------------------------------------------------------------------

def build(which: str, base: str, size: int) -> torch.nn.Module:
    """``edited``: timm ``base`` with SE (standard, r=16) retrofitted; ``native``: timm's ``se`` + base."""
    import timm
    import se_retrofit

    torch.manual_seed(0)
    if which == "native":
        return timm.create_model(f"se{base}")
    return se_retrofit.retrofit(timm.create_model(base), position="standard", reduction=16, inplace=True,
                                example_input=torch.zeros(1, 3, size, size))


def step(model: torch.nn.Module, optimizer, images, targets, device) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), targets)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def time_steps(base: str, batch: int, size: int, repeats: int, warmup: int, device: torch.device) -> dict:
    """Interleaved step times of the edited and the native model (seconds)."""
    models = {w: build(w, base, size).to(device).train() for w in ("edited", "native")}
    params = {w: sum(p.numel() for p in m.parameters()) for w, m in models.items()}
    optimizers = {w: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for w, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    targets = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    times = {w: [] for w in models}
    for r in range(warmup + repeats):
        for w in (("edited", "native") if r % 2 == 0 else ("native", "edited")):  # alternate who goes first
            began = time.perf_counter()
            step(models[w], optimizers[w], images, targets, device)
            if r >= warmup:
                times[w].append(time.perf_counter() - began)
    per_round = [e / n for e, n in zip(times["edited"], times["native"])]
    return {"params": params, "seconds": {w: spread(t) for w, t in times.items()}, "samples": times,
            "ratio_of_minima": min(times["edited"]) / min(times["native"]),
            "ratio_of_medians": statistics.median(times["edited"]) / statistics.median(times["native"]),
            "per_round_ratio": spread(per_round)}


def step_memory(which: str, base: str, batch: int, size: int, device: str) -> int:
    """Peak bytes of two optimiser steps above what the built model holds (this process only)."""
    device = torch.device(device)
    model = build(which, base, size).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    targets = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        for _ in range(2):
            step(model, optimizer, images, targets, device)
        return torch.cuda.max_memory_allocated() - held
    held = _rss_bytes()
    for _ in range(2):
        step(model, optimizer, images, targets, device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - held


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(base: str, batch: int, size: int, repeats: int, device: torch.device) -> dict:
    """Peak step memory of each model; on CPU in fresh processes (interleaved), on a GPU in this one."""
    peaks = {"edited": [], "native": []}
    for r in range(repeats):
        for which in (("edited", "native") if r % 2 == 0 else ("native", "edited")):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                peaks[which].append(step_memory(which, base, batch, size, str(device)))
                continue
            code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                    f"from bench_train import step_memory; "
                    f"print(step_memory({which!r}, {base!r}, {batch}, {size}, 'cpu'))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
            peaks[which].append(int(done.stdout.strip().splitlines()[-1]))
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (getrusage) above RSS after build"
    return {"how": how, "bytes": peaks, "ratio_of_minima": min(peaks["edited"]) / min(peaks["native"]),
            "ratio_of_medians": statistics.median(peaks["edited"]) / statistics.median(peaks["native"])}


# --- the fine-tuning loop against timm's train.py -------------------------------------------------

def make_images(root: Path, classes: int, per_class: int, size: int) -> Path:
    """ROOT/train and ROOT/val ImageFolders of PNG noise images (each class with one colour channel
    raised); both loops train on ROOT/train (the product needs a val split to exist)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] += 55
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


class ProductLoop:
    """One epoch of se-retrofit finetune's training loop (phase ``full``), on its own loaders."""

    def __init__(self, model, data: Path, batch: int, size: int, lr: float):
        from se_retrofit.finetune import distributed
        from se_retrofit.finetune.data import build_loaders, build_transforms, data_config, find_splits
        from se_retrofit.finetune.recipe import Recipe

        self.recipe = Recipe.from_dict({
            "name": "bench", "model": "resnet50", "retrofit": {},
            "phases": [{"name": "full", "trainable": "all", "epochs": 1000, "lr": lr, "new_lr_scale": 10}],
            "train": {"batch_size": batch, "workers": 0, "amp": False, "channels_last": False,
                      "label_smoothing": 0.1},
            "data": {"image_size": size, "scale": [0.08, 1.0], "hflip": 0.5, "color_jitter": 0.0}})
        self.context = distributed.Context.from_env(device="cpu")
        splits = find_splits(data, val_fraction=0.2)
        config = data_config(model, size)
        self.loader = build_loaders(splits, build_transforms(config, self.recipe.data), batch_size=batch, workers=0,
                                    seed=0)[0]
        self.model = model

    def start(self):
        from se_retrofit.finetune.trainer import start_phase

        self.ddp, self.optimizer, self.scheduler = start_phase(self.model, 0, self.recipe, len(self.loader),
                                                               self.context)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        self.epoch = 0

    def run_epoch(self) -> int:
        from se_retrofit.finetune.trainer import train_epoch

        self.epoch += 1
        self.loader.sampler.set_epoch(self.epoch)
        train_epoch(self.ddp, self.loader, self.optimizer, self.scheduler, None, self.criterion, self.context,
                    channels_last=False, advance=lambda loss: None)
        return len(self.loader.dataset)


class TimmTrainLoop:
    """The inner loop of timm's train.py (``train_one_epoch``) on timm's own dataset and loader."""

    def __init__(self, model, data: Path, batch: int, size: int, lr: float):
        from timm.data import create_dataset, create_loader, resolve_data_config

        self.model = model
        config = resolve_data_config(model=model)
        dataset = create_dataset("", root=str(data), split="train", is_training=True)
        self.loader = create_loader(dataset, input_size=(3, size, size), batch_size=batch, is_training=True,
                                    use_prefetcher=False, scale=(0.08, 1.0), hflip=0.5, color_jitter=None,
                                    interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
                                    num_workers=0, device=torch.device("cpu"))
        self.lr, self.images = lr, len(dataset)

    def start(self):
        from timm.loss import LabelSmoothingCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        self.optimizer = create_optimizer_v2(self.model, opt="sgd", lr=self.lr, weight_decay=1e-4, momentum=0.9)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=1000 * len(self.loader), t_in_epochs=False)
        self.loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
        self.epoch, self.updates = 0, 0

    def run_epoch(self) -> int:
        from contextlib import suppress
        from timm.utils import AverageMeter

        losses = AverageMeter()
        self.model.train()
        for images, targets in self.loader:
            with suppress():  # amp_autocast: suppress without --amp
                output = self.model(images)
                loss = self.loss_fn(output, targets)
            losses.update(loss.item(), images.size(0))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.updates += 1
            self.scheduler.step_update(num_updates=self.updates, metric=losses.avg)
        self.epoch += 1
        return self.images


def loop_throughput(base: str, batch: int, size: int, per_class: int, epochs: int) -> dict:
    """images/s of an epoch of each loop, alternating, each on its own copy of the same edited model."""
    import copy

    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp), 3, per_class, size + size // 8)
        model = build("edited", base, size)
        model.reset_classifier(3)  # the edited model keeps timm's class and methods
        loops = {"finetune": ProductLoop(copy.deepcopy(model), data, batch, size, 0.01),
                 "timm_train_py": TimmTrainLoop(copy.deepcopy(model), data, batch, size, 0.01)}
        rates = {name: [] for name in loops}
        for loop in loops.values():
            loop.start()
            loop.run_epoch()  # warm-up
        for e in range(epochs):
            for name in (("finetune", "timm_train_py") if e % 2 == 0 else ("timm_train_py", "finetune")):
                began = time.perf_counter()
                images = loops[name].run_epoch()
                rates[name].append(images / (time.perf_counter() - began))
    pairs = [a / b for a, b in zip(rates["finetune"], rates["timm_train_py"])]
    return {"images_per_epoch": loops["finetune"].loader.dataset.__len__(), "batch": batch, "size": size,
            "images_per_s": {n: spread(r) for n, r in rates.items()}, "samples": rates,
            "ratio_of_medians": statistics.median(rates["finetune"]) / statistics.median(rates["timm_train_py"]),
            "ratio_of_best": max(rates["finetune"]) / max(rates["timm_train_py"]), "per_pair_ratio": spread(pairs)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64 px, few repeats (smoke run)")
    parser.add_argument("--base", help="timm model with a timm se- twin (default resnet50; --quick resnet18)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, help="image side (default 224; --quick 64)")
    parser.add_argument("--repeats", type=int, help="timed step rounds (default 15; --quick 3)")
    parser.add_argument("--memory-repeats", type=int, help="memory measurements per model (default 3; --quick 1)")
    parser.add_argument("--epochs", type=int, help="timed epochs per loop (default 6; --quick 2)")
    parser.add_argument("--per-class", type=int, help="images per class of the loop's data (default 16; --quick 8)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--skip-loop", action="store_true", help="part 1 only")
    parser.add_argument("--json", type=Path, help="write every figure and sample here")
    args = parser.parse_args(argv)
    q = args.quick
    base, size = args.base or ("resnet18" if q else "resnet50"), args.size or (64 if q else 224)
    repeats, mem_repeats = args.repeats or (3 if q else 15), args.memory_repeats or (1 if q else 3)
    epochs, per_class = args.epochs or (2 if q else 6), args.per_class or (8 if q else 16)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    result = {"base": base, "batch": args.batch, "size": size, "threads": args.threads, "device": str(device),
              "torch": torch.__version__}
    result["step"] = time_steps(base, args.batch, size, repeats, 2, device)
    s = result["step"]
    print(f"one step, {base}+SE (edited) vs se{base} (timm), batch {args.batch} at {size}², {device}, "
          f"{args.threads} thread(s), {repeats} interleaved rounds:")
    for w in ("edited", "native"):
        print(f"  {w:7s} min {s['seconds'][w]['min'] * 1e3:8.1f} ms  median {s['seconds'][w]['median'] * 1e3:8.1f} ms"
              f"  ({s['params'][w]:,} parameters)")
    print(f"  time ratio edited/native: minima {s['ratio_of_minima']:.3f}, medians {s['ratio_of_medians']:.3f}; "
          f"per round min {s['per_round_ratio']['min']:.3f} median {s['per_round_ratio']['median']:.3f} "
          f"max {s['per_round_ratio']['max']:.3f} (goal <= 1.03)")
    result["memory"] = m = memory(base, args.batch, size, mem_repeats, device)
    print(f"  peak step memory ({m['how']}): edited {[round(b / 2**20) for b in m['bytes']['edited']]} MiB, "
          f"native {[round(b / 2**20) for b in m['bytes']['native']]} MiB; ratio minima {m['ratio_of_minima']:.3f}, "
          f"medians {m['ratio_of_medians']:.3f} (goal <= 1.02)")
    if not args.skip_loop and device.type == "cpu":
        result["loop"] = lp = loop_throughput(base, args.batch, size, per_class, epochs)
        print(f"training loop on the edited {base}, {lp['images_per_epoch']} PNG images/epoch, batch {args.batch} "
              f"at {size}², {epochs} alternating epochs per loop:")
        for n, r in lp["images_per_s"].items():
            print(f"  {n:14s} images/s min {r['min']:6.2f} median {r['median']:6.2f} max {r['max']:6.2f}")
        print(f"  finetune / train.py: medians {lp['ratio_of_medians']:.3f}, best epochs {lp['ratio_of_best']:.3f}; "
              f"per pair min {lp['per_pair_ratio']['min']:.3f} median {lp['per_pair_ratio']['median']:.3f} "
              f"max {lp['per_pair_ratio']['max']:.3f} (goal >= 0.95)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
