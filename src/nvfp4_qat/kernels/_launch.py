"""How the scale-sweep kernels are launched: ``launch(kernel, grid, *args, **kwargs)``.

It does what ``kernel[grid](*args, **kwargs)`` does, with less host time after the first call of
each specialization. Triton's ``JITFunction.run`` spent about half of its ~70 us per launch (H200
host, triton 3.6, the pruned sweep kernel) comparing every module-level constexpr the kernel reads
(23 there) with its value at compile time, which ours never change; the public sweep waits on its
launches with the GPU idle, and recalibration queues hundreds.

So a CUDA launch here runs Triton's own binder (the specialization of the arguments: dtypes, 16-byte
alignment, divisibility, which decides the compiled kernel that applies), looks the compiled kernel
up in :data:`_compiled` under that specialization and the options, and launches it as ``run`` would:
24.0 us against 43.1 through ``kernel[grid]`` (H200 host, medians, ``benchmarks/bench_public_call.py``).
The first launch of each specialization goes through ``kernel[grid]`` (which compiles or loads it),
and so does every launch while a Triton launch hook is set (profilers), every interpreted kernel,
and every launch after these internals turned out missing (another Triton). What ``run`` does and
this path does not: the check of the module globals (neither the sweep module nor ``fake_quant``
reassigns its constants) and the kernel's pre-run hooks (these kernels have none).

The sweep kernels and recalibration's stats pass (``fake_quant._stats_kernel``, ``_segment_kernel``)
use it: their GPU tests run with it. The fake-quant and activation kernels of the forward still take
Triton's own path: they were not tested on a GPU with it.
"""

from __future__ import annotations

import triton
from triton.runtime import driver
from triton.runtime.jit import JITFunction

#: Compiled kernels by (kernel, device, Triton's specialization of the arguments, options).
#: ``None`` once the direct path failed: every launch then takes Triton's own.
_compiled: dict | None = {}


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: see the module docstring."""
    global _compiled
    if not isinstance(kernel, JITFunction) or _compiled is None:  # interpreted, or no direct path
        kernel[grid](*args, **kwargs)
        return
    compiled = key = None
    try:
        runtime, compilation = triton.knobs.runtime, triton.knobs.compilation
        if not (_hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook)):
            device = driver.active.get_current_device()
            binder = kernel.device_caches[device][4]
            bound, specialization, options = binder(*args, **kwargs)
            # run() adds these settings to the options it compiles with: a change of any of them
            # must reach run() again, not reuse the kernel compiled without it.
            knobs = (kernel.debug, runtime.debug, getattr(compilation, "instrumentation_mode", None),
                     getattr(compilation, "fpsan_homomorphic_casts", None))  # fmt: skip
            key = (kernel, device, tuple(specialization), tuple(options.items()), knobs)
            compiled = _compiled.get(key)
    except (AttributeError, IndexError, KeyError, TypeError):  # not the Triton this was written for
        _compiled = key = None
    if compiled is None:
        launched = kernel[grid](*args, **kwargs)
        if key is not None and _compiled is not None:
            _compiled[key] = launched
        return
    grid = tuple(grid(bound) if callable(grid) else grid) + (1, 1)
    stream = driver.active.get_current_stream(device)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *bound.values())  # fmt: skip


def _hooked(hook) -> bool:
    # Whether a launch hook is set: Triton 3.6+ holds a HookChain that is never None (empty when no
    # profiler registered one); older versions hold None or a callable.
    return hook is not None and bool(getattr(hook, "calls", True))
