"""How much memory: the peak memory a piece of work adds (CUDA allocator, or the process's resident set on CPU),
the weights in memory, and the size of an adapter-only checkpoint on disk."""

from __future__ import annotations

import contextlib
import ctypes
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from bench_timing import synchronize
from transformers.utils import logging as hf_logging

from modeling_duplex import DuplexForCausalLM

_LIBC: ctypes.CDLL | None = None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the next peak is not hidden in recycled memory."""
    global _LIBC
    with contextlib.suppress(OSError, AttributeError):
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM); None where there is none (not Linux)."""
    with contextlib.suppress(OSError):
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) if match else None
    return None


def measure_peak_mb(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak memory added while `fn` runs, in MB: CUDA max_memory_allocated, or the process's RSS high-water mark
    (Linux: VmHWM, reset through /proc/self/clear_refs; elsewhere the getrusage high-water, which cannot be reset)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _trim_heap()
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = before is not None
    except OSError:
        resettable = False
    if not resettable:
        import resource

        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024
    fn()
    peak = _status_kib("VmHWM")
    return (peak - before) / 1024 if peak is not None else None


def weights_mb(module: torch.nn.Module) -> float:
    """Memory held by the parameters of `module`, in MB (2**20 bytes)."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def adapter_size_mb(model: DuplexForCausalLM, name: str) -> dict[str, float | list[str]]:
    """Size of the adapter-only checkpoint (`save_pretrained(adapter_only=True)`), written to a temporary folder:
    the weights file and the whole folder in MB (10**6 bytes), and the folder's file names. A model over random
    weights has no backbone path to record, so `random-weights/{name}` stands in for one while it is saved."""
    config = model.config
    saved_name = config.backbone_name_or_path
    config.backbone_name_or_path = saved_name or f"random-weights/{name}"
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, adapter_only=True)
            files = {p.name: p.stat().st_size for p in Path(folder).iterdir() if p.is_file()}
    finally:
        config.backbone_name_or_path = saved_name
        if progress_bars:
            hf_logging.enable_progress_bar()
    return {
        "adapter_weights_mb": files.get("adapter_model.safetensors", 0) / 1e6,
        "folder_mb": sum(files.values()) / 1e6,
        "files": sorted(files),
    }
