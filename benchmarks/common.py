"""Shared benchmark helpers: timing (median of repeats), memory, and a markdown table."""
from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Sequence
from typing import Callable, Optional

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


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


def interleaved_median(
    fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2, device=None
) -> dict[str, float]:
    """Median wall seconds of each ``fn``, the rows alternating repeat by repeat in this process:
    on a shared CPU, drift between rows timed minutes apart is larger than the differences measured."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def memory_floor(nbytes: int, device=None) -> dict[str, Callable[[], object]]:
    """The floor rows of a memory-bound op over ``nbytes`` of float32: one read pass (a row-wise sum,
    which runs at full bandwidth on all threads) and one read + write pass (``mul`` into a preallocated
    buffer: no allocation, no page faults)."""
    src = torch.randn(max(1, nbytes // 4 // 4096), 4096, device=device)
    dst = torch.empty_like(src)
    return {
        "floor: one read pass": lambda: src.sum(dim=-1),
        "floor: one read + write pass": lambda: torch.mul(src, 0.5, out=dst),
    }


def peak_rss_mb() -> float:
    """This process's peak RSS (MiB): since the last :func:`reset_peak_rss` where Linux allows it."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's current RSS (MiB); the peak where the current value cannot be read."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs``); False where that is not possible
    (the peak then includes everything since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
