"""The compile clock (Triton's JIT hooks, timed) and the report's note on a slow first call."""

from __future__ import annotations

import time

import pytest
import torch
import triton
import triton.language as tl

from nvfp4_qat import RecalibrationReport, quantize_model, recalibrate
from nvfp4_qat._compile_clock import compile_clock
from nvfp4_qat._feedback import done_line

runtime = triton.knobs.runtime


def test_clock_times_each_hook_pair_and_chains_and_restores_earlier_hooks():
    calls = []
    runtime.jit_cache_hook = lambda **kw: calls.append(("pre", kw["key"]))
    runtime.jit_post_compile_hook = lambda **kw: calls.append(("post", kw["key"]))
    try:
        earlier = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
        with compile_clock() as clock:
            for key in ("a", "b"):  # what Triton does around two compiles
                runtime.jit_cache_hook(key=key)
                time.sleep(0.05)
                runtime.jit_post_compile_hook(key=key)
        assert clock.kernels == 2
        assert 0.1 <= clock.seconds < 1.0
        assert calls == [("pre", "a"), ("post", "a"), ("pre", "b"), ("post", "b")]
        assert (runtime.jit_cache_hook, runtime.jit_post_compile_hook) == earlier
    finally:
        runtime.jit_cache_hook = runtime.jit_post_compile_hook = None


def test_a_compile_that_an_earlier_hook_skips_is_not_counted():
    runtime.jit_cache_hook = lambda **kw: kw["key"] == "skip"  # True: Triton does not compile
    try:
        with compile_clock() as clock:
            assert runtime.jit_cache_hook(key="skip") is True  # no post call follows
            runtime.jit_cache_hook(key="real")
            time.sleep(0.02)
            runtime.jit_post_compile_hook(key="real")
        assert clock.kernels == 1 and 0.02 <= clock.seconds < 0.5
    finally:
        runtime.jit_cache_hook = None
    assert runtime.jit_post_compile_hook is None


def test_a_hook_set_inside_the_block_is_kept():
    def theirs(**kw):
        return None

    try:
        with compile_clock():
            runtime.jit_cache_hook = theirs  # e.g. a profiler started by the caller's evaluate()
        assert runtime.jit_cache_hook is theirs and runtime.jit_post_compile_hook is None
    finally:
        runtime.jit_cache_hook = None


def test_clock_restores_the_hooks_when_the_block_raises():
    with pytest.raises(RuntimeError, match="boom"), compile_clock():
        raise RuntimeError("boom")
    assert runtime.jit_cache_hook is None and runtime.jit_post_compile_hook is None


def test_report_names_compile_time_from_one_second():
    report = RecalibrationReport(seconds=3.2, compile_seconds=2.54, execution="fused", backend="triton")
    assert "(2.5 s of it compiling or loading Triton kernels" in str(report).splitlines()[0]
    assert report.compile_note in str(report)
    line = done_line(3.2, {"rel_improvement": 0.1, "changed_fraction": 0.2}, report.compile_note)
    assert line.startswith("... done in 3.20 s (2.5 s of it compiling or loading Triton kernels")
    assert line.endswith("): weight MSE -10.0%, 20.0% of block scales moved")
    report.compile_seconds = 0.8
    assert report.compile_note == ""
    assert "compiling" not in str(report)


def test_recalibrate_on_the_cpu_reports_no_compile_time():
    torch.manual_seed(0)
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(32, 16)))
    report = recalibrate(model)
    assert report.compile_seconds == 0.0
    assert runtime.jit_cache_hook is None  # restored


@triton.jit
def _fresh_kernel(x_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i) + 1.0)


@pytest.mark.gpu
def test_clock_times_a_real_compile_and_not_a_cached_launch():
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA device")
    x = torch.zeros(64, device="cuda")
    with compile_clock() as first:
        _fresh_kernel[(1,)](x, BLOCK=64)  # a specialization this process has not compiled
    with compile_clock() as second:
        _fresh_kernel[(1,)](x, BLOCK=64)
    torch.cuda.synchronize()
    assert first.kernels == 1 and first.seconds > 0.0
    assert second.kernels == 0 and second.seconds == 0.0
    assert torch.equal(x, torch.full_like(x, 2.0))
