"""Measured cost on this machine: latency and peak memory of an edited model against the unedited one.

Both models are timed interleaved (one call of each per round, the order alternating, so that drift
and a busy neighbour hit both alike) after a warm-up, for inference (eval, no grad) and for a
training step (train mode, forward and backward of the outputs' mean; on copies, so no norm
statistics of the caller's model move). Reported: the ratio of the minima (the least noisy figure
on a shared machine), the ratio of the medians, and the spread of the per-round ratios (their
10th to 90th percentile). Peak memory is that of the tensors one call allocates (activations, and
gradients for a training step; not the parameters), from the profiler on the CPU and from the
allocator's peak on CUDA.

Example:
    >>> import timm, torch, se_retrofit
    >>> from se_retrofit.measure import measure
    >>> base = timm.create_model("resnet18").eval()
    >>> edited = se_retrofit.retrofit(base, stages=[4])
    >>> m = measure(base, edited, torch.randn(1, 3, 64, 64), repeats=3, train=False)
    >>> m["inference"]["ratio_min"] > 0, m["inference"]["edited_peak_mib"] > 0
    (True, True)
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .copying import deepcopy_module
from .cost import _call

__all__ = ["measure", "latency_ratio"]


def measure(base: nn.Module, edited: nn.Module, example_input: Any, *, repeats: int = 10,
            train: bool = True) -> dict[str, Any]:
    """Latency and peak memory of ``edited`` against ``base``, for inference and (``train``) a training step.

    Neither model is changed: the training step runs on copies.
    """
    base_eval, edited_eval = _eval_copy(base), _eval_copy(edited)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": repeats,
                              "device": str(_device(base))}

    def infer(model: nn.Module) -> Callable[[], Any]:
        def run():
            with torch.inference_mode():
                return _call(model, example_input)
        return run

    result["inference"] = {**_timed(infer(base_eval), infer(edited_eval), repeats),
                           **_memory(infer(base_eval), infer(edited_eval), _device(base))}
    if train:
        base_train, edited_train = deepcopy_module(base).train(), deepcopy_module(edited).train()
        try:
            result["training"] = {**_timed(_step(base_train, example_input), _step(edited_train, example_input),
                                           repeats),
                                  **_memory(_step(base_train, example_input), _step(edited_train, example_input),
                                            _device(base))}
        except RuntimeError as error:  # batch 1 through a norm that needs two values, …
            result["training"] = {"error": str(error).splitlines()[0][:200]}
    return result


def latency_ratio(base: nn.Module, edited: nn.Module, example_input: Any, repeats: int = 10) -> dict[str, float]:
    """Inference latency of ``edited`` against ``base`` (see :func:`measure`), without memory or training."""
    base_eval, edited_eval = _eval_copy(base), _eval_copy(edited)

    def infer(model: nn.Module) -> Callable[[], Any]:
        def run():
            with torch.inference_mode():
                return _call(model, example_input)
        return run

    return _timed(infer(base_eval), infer(edited_eval), repeats)


def _eval_copy(model: nn.Module) -> nn.Module:
    return model if not model.training else deepcopy_module(model).eval()


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _step(model: nn.Module, example_input: Any) -> Callable[[], None]:
    def run() -> None:
        outputs = [t for t in tree_leaves(_call(model, example_input))
                   if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
        sum(t.float().mean() for t in outputs).backward()
        model.zero_grad(set_to_none=True)
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(base: Callable[[], Any], edited: Callable[[], Any], repeats: int) -> dict[str, float]:
    for run in (base, edited, base, edited):  # warm-up
        run()
    times: dict[str, list[float]] = {"base": [], "edited": []}
    for round_ in range(max(1, repeats)):
        order = (("base", base), ("edited", edited)) if round_ % 2 == 0 else (("edited", edited), ("base", base))
        for key, run in order:
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    ratios = sorted(e / b for b, e in zip(times["base"], times["edited"]))
    low, high = ratios[int(0.1 * (len(ratios) - 1))], ratios[round(0.9 * (len(ratios) - 1))]
    b, e = times["base"], times["edited"]
    return {"base_ms_min": 1e3 * min(b), "base_ms_median": 1e3 * statistics.median(b),
            "edited_ms_min": 1e3 * min(e), "edited_ms_median": 1e3 * statistics.median(e),
            "ratio_min": min(e) / min(b), "ratio_median": statistics.median(e) / statistics.median(b),
            "ratio_spread": [low, high]}


def _memory(base: Callable[[], Any], edited: Callable[[], Any], device: torch.device) -> dict[str, float]:
    peaks = {}
    for key, run in (("base", base), ("edited", edited)):
        peaks[key] = _peak_bytes(run, device)
    if peaks["base"] is None or peaks["edited"] is None:
        return {}
    return {"base_peak_mib": peaks["base"] / 2 ** 20, "edited_peak_mib": peaks["edited"] / 2 ** 20,
            "peak_ratio": peaks["edited"] / peaks["base"] if peaks["base"] else float("nan")}


def _peak_bytes(run: Callable[[], Any], device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's native library writes start/stop lines to file descriptor 2: hide them."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
