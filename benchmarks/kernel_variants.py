"""Sweep-kernel variants against the library's kernel: the experiments behind BENCHMARKS.md (session 6).

The variants are built at run time from the library's kernel source (``_sweep_kernels.py``), so the
comparison is against exactly what ships:

* ``fp32``: the pruned pass's E2M1 decisions on ``u`` in fp32 (the kernel until session 7) instead
  of the library's fp16 round-to-odd copy (same decisions, two per compare instruction);
* ``chain``: the E2M1 magnitude picked by a chain of 7 dependent selects (the kernel until session 6)
  instead of the 3-level tree the library uses now;
* ``thread``: one thread per 16-element block: each block's elements as 16 separate ``[B]`` vectors
  (the library's ``[B, 16]`` tile gives each block to 2 threads of 8 elements), the same select tree.
  Measured 0.368 ms against 0.397 for the library's kernel at B256 w8 on an H200, with the same
  result; not adopted: Triton's CPU interpreter, which CI runs, is 3.6x slower on it.

Usage, from the repository root::

    python benchmarks/kernel_variants.py          # GPU: time each variant on 8192x4096 bf16, check equality
    python benchmarks/kernel_variants.py --sass   # any machine with triton: compile the pruned kernels
                                                  # for sm_90 and count SASS instructions

``--sass`` needs no GPU (Triton compiles for a named target with its bundled ``ptxas``); the counts
per scored element-code estimate the issue cost (13 codes: the window and both extra codes, unrolled).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

from nvfp4_qat.kernels import _sweep_kernels as K
from nvfp4_qat.kernels import sweep as ks

SOURCE = Path(K.__file__).read_text()
TREE_START = "    c1 = (u > t1) if _T1 else (u >= t1)\n"
TREE_END = "    dq = tl.where(c4, high, low)\n"
CHAIN = """    dq = tl.full([B, 16], 0.0, tl.float32)
    dq = tl.where((u > t1) if _T1 else (u >= t1), _Q1 * sv, dq)
    dq = tl.where((u > t2) if _T2 else (u >= t2), _Q2 * sv, dq)
    dq = tl.where((u > t3) if _T3 else (u >= t3), _Q3 * sv, dq)
    dq = tl.where((u > t4) if _T4 else (u >= t4), _Q4 * sv, dq)
    dq = tl.where((u > t5) if _T5 else (u >= t5), _Q5 * sv, dq)
    dq = tl.where((u > t6) if _T6 else (u >= t6), _Q6 * sv, dq)
    dq = tl.where((u > t7) if _T7 else (u >= t7), _Q7 * sv, dq)
"""
# The one-thread-per-block pruned kernel (the library's pruned pass with [B] vectors; it does not
# record max |x|, which the library's kernel does with one relaxed atomic per tile).
THREAD = """

@triton.jit
def _err(a, u, t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7):
    c1 = (u > t1) if _T1 else (u >= t1)
    c2 = (u > t2) if _T2 else (u >= t2)
    c3 = (u > t3) if _T3 else (u >= t3)
    c4 = (u > t4) if _T4 else (u >= t4)
    c5 = (u > t5) if _T5 else (u >= t5)
    c6 = (u > t6) if _T6 else (u >= t6)
    c7 = (u > t7) if _T7 else (u >= t7)
    low = tl.where(c2, tl.where(c3, d3, d2), tl.where(c1, d1, 0.0))
    high = tl.where(c6, tl.where(c7, d7, d6), tl.where(c5, d5, d4))
    d = a - tl.where(c4, high, low)
    return d * d


@triton.jit
def _loss16(a, u, v, s2):
    sv = v * s2
    t1 = (v * _M1).to(tl.float16)
    t2 = (v * _M2).to(tl.float16)
    t3 = (v * _M3).to(tl.float16)
    t4 = (v * _M4).to(tl.float16)
    t5 = (v * _M5).to(tl.float16)
    t6 = (v * _M6).to(tl.float16)
    t7 = (v * _M7).to(tl.float16)
    d1 = _Q1 * sv
    d2 = _Q2 * sv
    d3 = _Q3 * sv
    d4 = _Q4 * sv
    d5 = _Q5 * sv
    d6 = _Q6 * sv
    d7 = _Q7 * sv
    e0 = _err(a[0], u[0], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e1 = _err(a[1], u[1], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e2 = _err(a[2], u[2], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e3 = _err(a[3], u[3], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e4 = _err(a[4], u[4], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e5 = _err(a[5], u[5], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e6 = _err(a[6], u[6], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e7 = _err(a[7], u[7], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e8 = _err(a[8], u[8], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e9 = _err(a[9], u[9], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e10 = _err(a[10], u[10], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e11 = _err(a[11], u[11], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e12 = _err(a[12], u[12], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e13 = _err(a[13], u[13], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e14 = _err(a[14], u[14], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    e15 = _err(a[15], u[15], t1, t2, t3, t4, t5, t6, t7, d1, d2, d3, d4, d5, d6, d7)
    return (((e0 + e1) + (e2 + e3)) + ((e4 + e5) + (e6 + e7))) + (
        ((e8 + e9) + (e10 + e11)) + ((e12 + e13) + (e14 + e15))
    )


@triton.jit
def _el(x_ptr, base, j: tl.constexpr, mask, s2):
    a = tl.abs(tl.load(x_ptr + base + j, mask=mask, other=0.0).to(tl.float32))
    return a, _odd_f16(tl.math.div_rn(a, s2))  # the library's fp16 decision copy


@triton.jit
def _load16(x_ptr, rows, mask, s2):
    b = rows * 16
    a0, u0 = _el(x_ptr, b, 0, mask, s2)
    a1, u1 = _el(x_ptr, b, 1, mask, s2)
    a2, u2 = _el(x_ptr, b, 2, mask, s2)
    a3, u3 = _el(x_ptr, b, 3, mask, s2)
    a4, u4 = _el(x_ptr, b, 4, mask, s2)
    a5, u5 = _el(x_ptr, b, 5, mask, s2)
    a6, u6 = _el(x_ptr, b, 6, mask, s2)
    a7, u7 = _el(x_ptr, b, 7, mask, s2)
    a8, u8 = _el(x_ptr, b, 8, mask, s2)
    a9, u9 = _el(x_ptr, b, 9, mask, s2)
    a10, u10 = _el(x_ptr, b, 10, mask, s2)
    a11, u11 = _el(x_ptr, b, 11, mask, s2)
    a12, u12 = _el(x_ptr, b, 12, mask, s2)
    a13, u13 = _el(x_ptr, b, 13, mask, s2)
    a14, u14 = _el(x_ptr, b, 14, mask, s2)
    a15, u15 = _el(x_ptr, b, 15, mask, s2)
    m = tl.maximum(tl.maximum(tl.maximum(tl.maximum(a0, a1), tl.maximum(a2, a3)), tl.maximum(tl.maximum(a4, a5), tl.maximum(a6, a7))),
                   tl.maximum(tl.maximum(tl.maximum(a8, a9), tl.maximum(a10, a11)), tl.maximum(tl.maximum(a12, a13), tl.maximum(a14, a15))))
    return ((a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15),
            (u0, u1, u2, u3, u4, u5, u6, u7, u8, u9, u10, u11, u12, u13, u14, u15), m)


@triton.jit
def _sweep_pruned1_kernel(
    x_ptr, values_ptr, cands_ptr, g_ptr, out_ptr, code_ptr, old_ptr, part_ptr, part_stride,
    work_ptr, count_ptr, n_blocks,
    NUM_CANDIDATES: tl.constexpr, FIRST_DOUBLING: tl.constexpr, N_BELOW: tl.constexpr,
    N_EXTRA: tl.constexpr, BLOCK_B: tl.constexpr,
):
    N_WINDOW: tl.constexpr = N_BELOW + 8
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rows < n_blocks) & _live(g_ptr, BLOCK_B)
    g = tl.load(g_ptr)
    s2 = tl.math.div_rn(g, tl.full([], _DIVISOR, tl.float32))
    a, u, m = _load16(x_ptr, rows, mask, tl.full([BLOCK_B], 0.0, tl.float32) + s2)
    u_max = tl.math.div_rn(m, tl.full([BLOCK_B], 0.0, tl.float32) + s2)
    lo = tl.full([BLOCK_B], 0, tl.int32)
    hi = tl.full([BLOCK_B], NUM_CANDIDATES, tl.int32)
    for _ in tl.static_range(7):
        mid = (lo + hi) // 2
        ok = _QMAX * tl.load(values_ptr + tl.minimum(mid, NUM_CANDIDATES - 1)) >= u_max
        active = lo < hi
        hi = tl.where(active & ok, mid, hi)
        lo = tl.where(active & ~ok, mid + 1, lo)
    k0 = lo
    start = tl.minimum(tl.maximum(k0 - N_BELOW, 0), NUM_CANDIDATES - N_WINDOW)
    best_loss = tl.full([BLOCK_B], float("inf"), tl.float32)
    best_idx = start
    for i in tl.static_range(N_WINDOW):
        loss = _loss16(a, u, tl.load(values_ptr + start + i), s2)
        better = loss < best_loss
        best_loss = tl.where(better, loss, best_loss)
        best_idx = tl.where(better, start + i, best_idx)
    gap = tl.maximum(m - _QMAX * (tl.load(values_ptr + tl.maximum(start - 1, 0)) * s2), 0.0)
    bound_fails = (start > 0) & ~(gap * gap > best_loss)
    for _ in tl.static_range(N_EXTRA):
        if tl.reduce(bound_fails.to(tl.int32), None, _MAX) > 0:
            start = tl.maximum(start - 1, 0)
            loss = _loss16(a, u, tl.load(values_ptr + start), s2)
            better = bound_fails & (loss <= best_loss)
            best_loss = tl.where(better, loss, best_loss)
            best_idx = tl.where(better, start, best_idx)
            gap = tl.maximum(m - _QMAX * (tl.load(values_ptr + tl.maximum(start - 1, 0)) * s2), 0.0)
            bound_fails = (start > 0) & ~(gap * gap > best_loss)
    subnormal = (k0 < FIRST_DOUBLING) & (m > 0)
    tiny = tl.full([BLOCK_B], 0.0, tl.float32) + s2 < _TINY_S2
    flag = (bound_fails | subnormal | tiny) & mask
    amax = tl.load(cands_ptr + best_idx) * g
    tl.store(out_ptr + rows, amax, mask=mask & ~flag)
    _store_stats(code_ptr, old_ptr, part_ptr, part_stride, tl.program_id(0), rows, best_idx, best_loss, mask & ~flag, False)
    slot = tl.atomic_add(count_ptr + tl.full([BLOCK_B], 0, tl.int32), 1, mask=flag)
    tl.store(work_ptr + slot, rows.to(tl.int32), mask=flag & (slot < n_blocks))

"""


def variant(name: str):
    """The variant module ``name`` ("fp32", "chain" or "thread"), written to a temporary file and imported."""
    if name == "fp32":
        text = SOURCE.replace("return absw, u, _odd_f16(u), s2, g", "return absw, u, u, s2, g")
        text = text.replace("    if F16:", "    if False:")
        if text.count("    if False:") != 1 or "u, _odd_f16(u), s2" in text:
            raise RuntimeError("the library's decision code changed: update the fp32 variant")
    elif name == "chain":
        i, j = SOURCE.index(TREE_START), SOURCE.index(TREE_END) + len(TREE_END)
        text = SOURCE[:i] + CHAIN + SOURCE[j:]
    else:
        i = SOURCE.index("\ndef interpreted(")
        text = SOURCE[:i] + THREAD + SOURCE[i:]
    path = Path(tempfile.mkdtemp()) / f"sweep_variant_{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


SIGNATURE = {"x_ptr": "*bf16", "values_ptr": "*fp32", "cands_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": "*fp32",
             "code_ptr": "*u8", "old_ptr": "*u8", "part_ptr": "*fp32", "part_stride": "i32", "work_ptr": "*i32",
             "count_ptr": "*i32", "n_blocks": "i32", "NUM_CANDIDATES": "constexpr", "FIRST_DOUBLING": "constexpr",
             "N_BELOW": "constexpr", "N_EXTRA": "constexpr", "BLOCK_B": "constexpr"}  # fmt: skip


def sass_counts(fn, block_b: int, num_warps: int) -> collections.Counter:
    """SASS opcode counts of ``fn`` (a pruned kernel) compiled for sm_90, without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {"NUM_CANDIDATES": 126, "FIRST_DOUBLING": ks.FIRST_DOUBLING, "N_BELOW": ks.N_BELOW,
                  "N_EXTRA": ks.N_EXTRA, "BLOCK_B": block_b}  # fmt: skip
    aligned = [(i,) for i, (n, t) in enumerate(SIGNATURE.items()) if t.startswith("*") or n == "n_blocks"]
    src = ASTSource(fn, SIGNATURE, constexprs, {k: [["tt.divisibility", 16]] for k in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "enable_fp_fusion": False})  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    return ops


def run_sass() -> None:
    codes = ks.N_BELOW + 8 + ks.N_EXTRA  # unrolled: the window and both extra codes
    rows = [("library (tree, [B, 16] tile)", K._sweep_pruned_kernel, 32, 2, 8),
            ("fp32 decisions", variant("fp32")._sweep_pruned_kernel, 32, 2, 8),
            ("chain", variant("chain")._sweep_pruned_kernel, 32, 2, 8),
            ("thread (tree, [B] x 16)", variant("thread")._sweep_pruned1_kernel, 128, 4, 16)]  # fmt: skip
    print(f"triton {triton.__version__}, sm_90 SASS of the pruned pass; {codes} codes unrolled")
    print(f"{'kernel':<30} {'instructions':>12} {'per element-code':>17}  top opcodes")
    for name, fn, block_b, warps, per_thread in rows:
        ops = sass_counts(fn, block_b, warps)
        total = sum(ops.values())
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(4))
        print(f"{name:<30} {total:>12} {total / (codes * per_thread):>17.1f}  {top}")


def run_gpu() -> None:
    from triton.testing import do_bench

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    torch.manual_seed(0)
    x = torch.randn(8192, 4096, device=dev).to(torch.bfloat16)
    g = x.abs().max().float().reshape(1)
    bench = lambda fn: do_bench(fn, warmup=50, rep=500, return_mode="median")  # noqa: E731
    want = {m: ks.launch_sweep(x, g, m)[0].clone() for m in ("pruned", "exhaustive")}
    for m in ("pruned", "exhaustive"):
        print(f"library {m}: {bench(lambda m=m: ks.launch_sweep(x, g, m)):.4f} ms")
        for name in ("fp32", "chain"):
            ks._k = variant(name)  # the launcher reads its kernels from this module
            try:
                same = torch.equal(ks.launch_sweep(x, g, m)[0], want[m])
                print(f"{name} {m}: {bench(lambda m=m: ks.launch_sweep(x, g, m)):.4f} ms, equal: {same}")
            finally:
                ks._k = K
    thread = variant("thread")
    n, flat = x.numel() // 16, x.reshape(-1)
    values, cands = ks._candidate_tables(dev)
    out, codes = torch.empty(n, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    part = torch.zeros(ks.STATS_ROWS, ks.stats_slots(n), device=dev)
    work, count = torch.empty(n, dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)
    for block_b, warps in [(128, 4), (256, 8), (256, 4)]:

        def run(block_b=block_b, warps=warps):
            count.zero_()
            thread._sweep_pruned1_kernel[(triton.cdiv(n, block_b),)](
                flat, values, cands, g, out, codes, codes, part, part.stride(0), work, count, n,
                NUM_CANDIDATES=126, FIRST_DOUBLING=ks.FIRST_DOUBLING, N_BELOW=ks.N_BELOW, N_EXTRA=ks.N_EXTRA,
                BLOCK_B=block_b, num_warps=warps, enable_fp_fusion=False)  # fmt: skip

        run()
        same = torch.equal(out, want["pruned"]) and int(count) == 0
        print(f"thread pruned B{block_b} w{warps}: {bench(run):.4f} ms, equal: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", action="store_true", help="count SASS instructions (no GPU needed)")
    args = parser.parse_args()
    if args.sass:
        run_sass()
    elif torch.cuda.is_available():
        run_gpu()
    else:
        sys.exit("no CUDA device: run with --sass, or on a GPU machine")


if __name__ == "__main__":
    main()
