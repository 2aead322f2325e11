"""How long a piece of work spent compiling (or loading from Triton's disk cache) Triton kernels.

A process's first recalibration also prepares every kernel it launches: 0.8-0.9 s with a warm Triton
cache, 3.3-6.4 s cold, on an H200 host (``benchmarks/bench_first_call.py``, BENCHMARKS.md). The
recalibration report says so when it is a second or more, so that a slow first call is not mistaken
for the steady cost. Triton calls its JIT hooks (``triton.knobs.runtime``) right before and right
after it compiles or loads a specialization that it does not hold in memory yet, and never on a
launch that finds one: :func:`compile_clock` sets them for the duration of a ``with`` block, adds
up the time between each pair, and passes every call on to hooks that were already set.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class CompileClock:
    """What a :func:`compile_clock` block measured: seconds and kernel specializations prepared."""

    seconds: float = 0.0
    kernels: int = 0


@contextlib.contextmanager
def compile_clock() -> Iterator[CompileClock]:
    """Time Triton's kernel compiles and cache loads inside the block (0 without Triton, or with a
    Triton that has no JIT hooks). The hooks are process-wide: blocks in two threads at once may
    each count the other's compiles. Loading a compiled module onto the GPU is not in these hooks:
    the figure is a lower bound of a first call's extra time."""
    clock = CompileClock()
    try:
        import triton
    except ImportError:
        yield clock
        return
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if (
        runtime is None
        or not hasattr(runtime, "jit_cache_hook")
        or not hasattr(runtime, "jit_post_compile_hook")
    ):
        yield clock
        return
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    started: list[float] = []

    def pre(**kwargs):
        started.append(time.perf_counter())
        skip = before(**kwargs) if before is not None else None
        if skip:  # the earlier hook told Triton not to compile: no post call will come
            started.pop()
        return skip

    def post(**kwargs):
        if started:
            clock.seconds += time.perf_counter() - started.pop()
            clock.kernels += 1
        return after(**kwargs) if after is not None else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = pre, post
    try:
        yield clock
    finally:  # put back what was there, unless someone replaced ours meanwhile (theirs then stays)
        if runtime.jit_cache_hook is pre:
            runtime.jit_cache_hook = before
        if runtime.jit_post_compile_hook is post:
            runtime.jit_post_compile_hook = after
