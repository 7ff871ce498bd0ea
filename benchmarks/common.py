"""Shared benchmark helpers: timing (median of repeats), memory, and a markdown table."""
from __future__ import annotations

import platform
import resource
import statistics
import time
from typing import Callable, Optional, Sequence

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(device: Optional[torch.device] = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 2, device=None) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], exclude: Optional[torch.Tensor] = None) -> int:
    """Bytes of the tensors autograd saves for backward while running ``fn`` (distinct storages),
    leaving out ``exclude``'s storage (e.g. logits kept alive anyway)."""
    seen: dict[int, int] = {}
    skip = None if exclude is None else exclude.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() != skip:
                seen[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)
