"""Memory meters for torch computations, shared by the benchmark and the tests: the bytes autograd saves
for the backward pass, and the CPU allocator's peak (the CPU stand-in for torch.cuda.max_memory_allocated)."""
from collections.abc import Callable
from typing import Self

import torch


def storage_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind tensors (views of one storage count once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def saved_tensor_bytes(fn: Callable, *args, **kwargs) -> int:
    """Exact bytes autograd keeps for the backward pass of one call fn(*args, **kwargs) (distinct storages,
    device-independent). Run it under the autocast state that is to be measured.

    Args:
        fn: a function or module.
        args, kwargs: its inputs (the tensors to differentiate must require grad).
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(storages.values())


class CpuPeakBytes:
    """Context manager: peak CPU bytes allocated inside it, above `base` (what was alive before), replayed
    from torch.profiler's allocation events (allocator level, exact: no allocator rounding or library
    workspaces, as on a GPU).

    Args:
        base: bytes already alive at entry, added to the running total (0: the peak is what the block adds).
    Attributes:
        peak: the peak, set when the block exits.
    """

    def __init__(self, base: int = 0):
        self.base = self.peak = base
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> Self:
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = self.base
        for _, nbytes in events:  # negative for frees
            live += nbytes
            self.peak = max(self.peak, live)
        return False
