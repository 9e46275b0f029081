"""Peak memory of one piece of work, above what was held just before it.

On CUDA: the caching allocator's statistics (`torch.cuda.max_memory_allocated`). On a CPU: the process's resident
set, read from Linux's /proc/self/status, with its high-water mark (VmHWM) reset just before the work (writing 5
to /proc/self/clear_refs). That counts everything the process touches (tensors, the file pages it reads, Python
objects), so it is an upper bound on the tensors' peak. glibc keeps freed heap memory unless large blocks are
mapped separately: run the measuring process with MALLOC_MMAP_THRESHOLD_=65536 (`CPU_PROBE_ENV`) so a freed
tensor leaves the resident set.
"""

from collections.abc import Callable
from pathlib import Path

import torch

CPU_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(work: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int, int]:
    """(what `work` returned, peak bytes above the start, bytes still held at the end above the start)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = work()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start, torch.cuda.memory_allocated(device) - start
    start = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    result = work()
    return result, 1024 * (_status_kib("VmHWM") - start), 1024 * (_status_kib("VmRSS") - start)
