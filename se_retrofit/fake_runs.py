"""Runs on fake tensors that leave nothing behind in the caller's model or in the libraries it uses.

On fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``) a model computes shapes only, and
every tensor it makes is fake, including what it keeps for later: transformers' detectors cache their
anchor grids per module and per size (``compile_compatible_method_lru_cache``), other models keep
position tables in ``functools.lru_cache`` keyed by sizes. A real call made afterwards would be
handed the fake tensor from the cache (RT-DETR then returns fake logits). So a fake run:

* runs a fake copy of the module tree (:func:`~se_retrofit.copying.fake_copy`), never the caller's
  modules: whatever a module stores on itself, or in a cache keyed by itself, belongs to the copy;
* empties every ``functools`` cache that missed during the run (:func:`caches_emptied_after`): what it
  stored may be fake. A cache only saves work, so emptying one changes no result.

Example:
    >>> import functools, torch
    >>> from torch._subclasses.fake_tensor import FakeTensorMode
    >>> @functools.lru_cache
    ... def grid(n):
    ...     return torch.arange(n)
    >>> with FakeTensorMode() as mode, caches_emptied_after():
    ...     _ = grid(4)
    >>> type(grid(4)).__name__
    'Tensor'
"""
from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator


def _misses_by_cache() -> dict[int, tuple[object, int]]:
    return {id(obj): (obj, obj.cache_info().misses) for obj in gc.get_objects()
            if type(obj) is functools._lru_cache_wrapper}  # type(): some objects warn on isinstance


@contextlib.contextmanager
def caches_emptied_after() -> Iterator[None]:
    """Empty each ``functools.lru_cache`` (and ``functools.cache``) that missed inside the block,
    including caches made inside it; those that only hit keep their entries."""
    before = _misses_by_cache()
    try:
        yield
    finally:
        for key, (cache, misses) in _misses_by_cache().items():
            if key not in before or misses != before[key][1]:
                cache.cache_clear()
