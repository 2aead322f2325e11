"""Interpreted copies of a module's Triton kernels, for CPU tensors under ``TRITON_INTERPRET=1``.

A kernel jitted at import (CUDA) cannot simply be run by Triton's interpreter: an interpreted
kernel cannot call a jitted helper. :func:`interpreted` copies the module's globals and replaces
every jitted function defined there by an interpreted one that resolves its callees in the copy,
so kernels and their helpers run interpreted while the compiled CUDA kernels stay intact in the
same process. Helpers imported from another module of the package are taken from that module's copy.
"""

from __future__ import annotations

import functools
import sys
import types

from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import KernelInterface


@functools.cache
def _namespace(module_name: str) -> dict:
    ns = dict(vars(sys.modules[module_name]))
    for name, obj in list(ns.items()):
        if isinstance(obj, KernelInterface):
            raw = obj
            while not isinstance(raw, types.FunctionType):
                raw = raw.fn  # Autotuner -> JITFunction / InterpretedFunction -> function
            if raw.__module__ != module_name:
                if raw.__module__.partition(".")[0] == module_name.partition(".")[0]:
                    # a helper imported from another module of this package: its own interpreted copy
                    ns[name] = _namespace(raw.__module__)[raw.__name__]
                continue  # Triton's combine functions (tl.standard._sum_combine ...): the interpreter knows them
            copy = types.FunctionType(raw.__code__, ns, raw.__name__, raw.__defaults__, raw.__closure__)
            ns[name] = InterpretedFunction(copy)
    return ns


def interpreted(module_name: str, name: str) -> InterpretedFunction:
    """Kernel ``name`` of module ``module_name``, built for Triton's CPU interpreter (cached)."""
    return _namespace(module_name)[name]
