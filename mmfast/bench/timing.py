"""Timing: median of CUDA-event timings on a GPU (``triton.testing.do_bench``), of wall-clock timings on
CPU; peak memory; the device-to-device copy bandwidth every GB/s figure is compared with."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: Sequence[torch.Tensor] = (),
    warmup_ms: float = 25,
    rep_ms: float = 100,
) -> float:
    """Median milliseconds of one call of ``fn`` (after warm-up; gradients of ``grad_to_none`` cleared
    before each call so accumulation is not timed)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none), return_mode="median"))

    def once() -> float:
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    first = once()  # warm-up (and a first estimate)
    reps = max(3, min(50, int(rep_ms / max(first, 1e-3))))
    return statistics.median(once() for _ in range(reps))


def median_ms_graph(fn: Callable[[], object], device: torch.device, *, grad_to_none: Sequence[torch.Tensor] = (),
                    warmup_ms: float = 25, rep_ms: float = 100, stream: torch.cuda.Stream | None = None) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph: launch overhead is gone,
    what remains is the kernels' own time. Gradients are cleared once before capture (replays then
    write into the same buffers).

    ``fn`` is warmed up and captured on ``stream`` (default: a new side stream). A backward alone must be
    captured on the stream its forward ran on: autograd runs each backward node on its forward's stream,
    and a node of a stream outside the capture invalidates it."""
    for t in grad_to_none:
        t.grad = None
    side = stream if stream is not None else torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture needs the work (and its allocations) warmed up off-stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    for t in grad_to_none:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's calls can invalidate the capture (the default, global, is also
    # broken by any other thread's unsafe CUDA call, e.g. a compile worker's)
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        fn()
    return median_ms(graph.replay, device, warmup_ms=warmup_ms, rep_ms=rep_ms)


def busy_us(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end]`` intervals: time the GPU had work, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


#: What the L2 flush's kernel name contains: ``bitwise_not_`` of a uint8 buffer, an op no timed case runs,
#: so the flush's own interval can be told apart and left out of the busy time.
FLUSH_KERNEL = "bitwise_not"


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice the device's L2 (at least 128 MiB): writing it evicts everything a timed call left there."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    return torch.empty(max(2 * l2, 128 << 20), dtype=torch.uint8, device=device)


def gpu_busy_ms(fn: Callable[[], object], device: torch.device, *, grad_to_none: Sequence[torch.Tensor] = (),
                iters: int = 10, flush_l2: bool = True) -> float | None:
    """GPU time of one call of ``fn``: the profiler's kernel (and memset / memcpy) intervals over ``iters``
    calls, their union divided by ``iters``. Unlike :func:`median_ms` this leaves out the gaps the host
    leaves between kernels, so it measures the kernels whatever the host's speed. With ``flush_l2`` the
    L2 is flushed before each call, as ``do_bench`` does for the event timings (a working set near the L2's
    size would otherwise be partly served from it), and the flush's kernel is left out. None off a GPU."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    flush = _flush_buffer(device) if flush_l2 else None
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for t in grad_to_none:
                t.grad = None
            if flush is not None:
                flush.bitwise_not_()
            fn()
        torch.cuda.synchronize(device)
    gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    flushes = [e for e in gpu if FLUSH_KERNEL in e.name]
    if flush is not None and len(flushes) != iters:
        raise RuntimeError(f"could not tell the L2 flush kernels apart in the profile ({len(flushes)} named "
                           f"'{FLUSH_KERNEL}', expected {iters})")
    intervals = [(e.time_range.start, e.time_range.end) for e in gpu if flush is None or FLUSH_KERNEL not in e.name]
    if not intervals:
        raise RuntimeError("the profiler recorded no GPU activity")
    return busy_us(intervals) / iters / 1e3


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory allocated by ``fn`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


#: Copies whose busy time gives the copy bandwidth (after the warm-up).
COPY_ITERS = 30


def copy_gbps(device: torch.device, nbytes: int) -> float:
    """Bandwidth of a device-to-device copy of ``nbytes`` (bytes read + bytes written per second / 1e9).

    Timed the way the records' GB/s are: on a GPU from the copy kernel's busy time (:func:`gpu_busy_ms`,
    as every record with a ``gpu_ms``), elsewhere from the median wall time. A fraction of copy divides
    two figures taken by one method, or the per-call gap an event timing adds to the copy alone would
    push every fraction up."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        # the run's first GPU work: copy for a while first, so the clocks are the steady ones the timed
        # cases see (a low copy figure would inflate every fraction of it)
        median_ms(lambda: dst.copy_(src), device, warmup_ms=200, rep_ms=100)
        # (no L2 flush: the copy's gigabyte is far above any L2, and the flush would only add time)
        ms = gpu_busy_ms(lambda: dst.copy_(src), device, iters=COPY_ITERS, flush_l2=False)
    else:
        ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
