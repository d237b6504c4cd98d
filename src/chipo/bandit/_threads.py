"""Run small-tensor solver loops on one thread (torch intra-op and OpenBLAS).

The estimators call tiny numerical kernels (a few hundred parameters) thousands of times. On a loaded 2-core
machine every multi-threaded call pays a fixed cost of waiting for the second core (measured here: ~16 ms per
torch ``log_sigmoid`` call and ~6 ms per scipy L-BFGS-B step with 2 threads, against ~0.02 ms and ~1 ms with one).
``single_thread()`` sets both pools to one thread and restores them on exit. OpenBLAS is reached through its
``*_set_num_threads`` symbols in the loaded shared libraries (numpy's and scipy's bundled copies); if none is
found the context only affects torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch

_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
        "openblas_set_num_threads")
_GET = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads64_",
        "openblas_get_num_threads")


@functools.lru_cache(maxsize=1)
def _openblas_handles() -> tuple[tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]]:
    """(set, get) function pairs of every OpenBLAS loaded in this process (Linux /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.split()[-1].lower()}
    except OSError:
        return ()
    handles = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _SET if hasattr(lib, s)), None)
        getter = next((getattr(lib, g) for g in _GET if hasattr(lib, g)), None)
        if setter is not None and getter is not None:
            setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
            handles.append((setter, getter))
    return tuple(handles)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Torch and OpenBLAS on one thread inside the block; previous settings restored afterwards."""
    previous_torch = torch.get_num_threads()
    blas = _openblas_handles()
    previous_blas = [get() for _, get in blas]
    torch.set_num_threads(1)
    for setter, _ in blas:
        setter(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous_torch)
        for (setter, _), n in zip(blas, previous_blas, strict=True):
            setter(max(1, n))
