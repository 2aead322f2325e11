"""Sweep-kernel variants against the library's pruned pass: the experiments behind BENCHMARKS.md.

The variants are built at run time from the library's kernel source (``_sweep_kernels.py``), so the
comparison is against exactly what ships (one thread per block, fp16 decision copy, select tree):

* ``select``: the decisions and the magnitude by compares and a tree of selects (``_sq_err``, what
  the interpreter runs, and the CUDA kernel until session 8) instead of the packed ``set.f16x2``
  arithmetic of ``_PAIR_ASM``;
* ``fp32``: ``select`` with the E2M1 decisions on ``u`` in fp32 instead of the fp16 round-to-odd
  copy (same decisions; fp16 packs two per compare instruction);
* ``chain``: ``select`` with the E2M1 magnitude picked by a chain of 7 dependent selects (the kernel until
  session 6) instead of the 3-level tree;
* ``divide``: the packed pass as session 8 left it: ``u = |w| / s2`` by a division per element
  (``div.rn``) and the fp16 decision copies by bit manipulation (``_odd_f16_bits``), instead of
  ``_quotient``'s multiply and two FMA corrections and one ``cvt.rz.f16x2`` per pair
  (``_ODD_PAIR_ASM``), and a pair's 7 decisions added to a sum that starts at 0 instead of summed per
  run of equal steps;
* ``tile``: the pruned pass of session 7's first commits: a ``[B, 16]`` tile that gives each block to
  2 threads of 8 elements (``_block_loss``, as the exhaustive and work-list kernels still use),
  instead of one thread per block holding 16 ``[B]`` vectors.

Usage, from the repository root::

    python benchmarks/kernel_variants.py          # GPU: time each variant on 8192x4096 bf16, check equality
                                                  # (the library with and without its bf16 pass; the
                                                  # variants without it; "tile" is not timed)
    python benchmarks/kernel_variants.py --sass   # any machine with triton: compile the pruned kernels
                                                  # for sm_90 and count SASS instructions (also the
                                                  # looped form's prologue, loop and registers, and
                                                  # the stats kernel's loop; --stats-from FILE: that
                                                  # of another fake_quant.py)

``--sass`` needs no GPU (Triton compiles for a named target with its bundled ``ptxas``); the counts
per scored element-code estimate the issue cost (13 codes: the window and both extra codes, unrolled
for the count; the library runs the window as a loop, which compiles ~8x faster).
Triton versions differ in the code they generate: compare counts from one version only.
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
TREE_END = "    e = a - tl.where(c4, high, low)\n"
CHAIN = """    dq = tl.zeros_like(a)
    dq = tl.where((u > t1) if _T1 else (u >= t1), _Q1 * sv, dq)
    dq = tl.where((u > t2) if _T2 else (u >= t2), _Q2 * sv, dq)
    dq = tl.where((u > t3) if _T3 else (u >= t3), _Q3 * sv, dq)
    dq = tl.where((u > t4) if _T4 else (u >= t4), _Q4 * sv, dq)
    dq = tl.where((u > t5) if _T5 else (u >= t5), _Q5 * sv, dq)
    dq = tl.where((u > t6) if _T6 else (u >= t6), _Q6 * sv, dq)
    dq = tl.where((u > t7) if _T7 else (u >= t7), _Q7 * sv, dq)
    e = a - dq
"""
# Session 7's [B, 16]-tile pruned pass (commit fbedddb), renamed; it records max |x| of its tile
# without the NaN-as-inf cleaning of the library's (a difference only for non-finite input).
TILE = """

@triton.jit
def _sweep_pruned_tile_kernel(
    x_ptr,  # [n_blocks * 16] fp32/fp16/bf16
    values_ptr,  # [126] fp32, FP8 code values
    cands_ptr,  # [126] fp32, code values / 448
    g_ptr,  # [1] fp32, global amax
    out_ptr,  # [n_blocks] fp32, block amax (flagged blocks are left to the second pass)
    code_ptr,  # [n_blocks] uint8, FP8 byte of the winning code
    old_ptr,  # [n_blocks] uint8, FP8 byte of the block's previous scale
    part_ptr,  # [3, part_stride] fp32, per-program loss sums and changed counts; row 2: see _store_amax
    part_stride,
    work_ptr,  # [n_blocks] int32, indices of flagged blocks
    count_ptr,  # [1] int32, number of flagged blocks (zeroed by the caller)
    n_blocks,
    NUM_CANDIDATES: tl.constexpr,
    FIRST_DOUBLING: tl.constexpr,  # first k from which v[k + 8] == 2 * v[k] (normal codes)
    N_BELOW: tl.constexpr,  # codes scored below k0 by every block
    N_EXTRA: tl.constexpr,  # further codes below, scored by a tile only where its bound fails
    PACKED: tl.constexpr,  # unused here (the launcher passes it)
    BLOCK_B: tl.constexpr,
):
    # Per-block values are kept as [B, 1] columns of the [B, 16] tile so that they share its
    # layout (1-D vectors would be shuffled through shared memory at every code).
    N_WINDOW: tl.constexpr = N_BELOW + 8
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rows < n_blocks) & _live(g_ptr, BLOCK_B)  # all False: nothing read, written or flagged
    absw, u, s2, g = _load_blocks(x_ptr, rows, mask, g_ptr, BLOCK_B)
    uh = _odd_f16(u)
    m = tl.reduce(absw, 1, _MAX, keep_dims=True)  # [B, 1]
    u_max = tl.reduce(u, 1, _MAX, keep_dims=True)  # = fl(m / s2): rounding is monotone

    # k0 = first code with 6 * v >= u_max (126 if none): binary search over the table.
    lo = tl.full([BLOCK_B, 1], 0, tl.int32)
    hi = tl.full([BLOCK_B, 1], NUM_CANDIDATES, tl.int32)
    for _ in tl.static_range(7):  # 2**7 > 126
        mid = (lo + hi) // 2
        ok = _QMAX * tl.load(values_ptr + tl.minimum(mid, NUM_CANDIDATES - 1)) >= u_max
        active = lo < hi
        hi = tl.where(active & ok, mid, hi)
        lo = tl.where(active & ~ok, mid + 1, lo)
    k0 = lo

    # Score the window [start, start + N_WINDOW), which always covers [k0 - N_BELOW, k0 + 7].
    start = tl.minimum(tl.maximum(k0 - N_BELOW, 0), NUM_CANDIDATES - N_WINDOW)
    best_loss = tl.full([BLOCK_B, 1], float("inf"), tl.float32)
    best_idx = start
    for i in tl.static_range(N_WINDOW):
        loss = _block_loss(absw, uh, tl.load(values_ptr + start + i), s2, BLOCK_B, True)[:, None]
        better = loss < best_loss
        best_loss = tl.where(better, loss, best_loss)
        best_idx = tl.where(better, start + i, best_idx)

    # Below the window: the max element's saturation error bounds every smaller code's loss. Where
    # the bound at start - 1 does not beat the best loss yet (about 1 block in 100), the whole tile
    # scores one more code downwards, up to N_EXTRA times: for the other blocks that code is
    # already beaten, and a lower code wins a tie (<=). Blocks still unresolved are flagged.
    gap = tl.maximum(m - _QMAX * (tl.load(values_ptr + tl.maximum(start - 1, 0)) * s2), 0.0)
    bound_fails = (start > 0) & ~(gap * gap > best_loss)
    for _ in tl.static_range(N_EXTRA):
        if tl.reduce(bound_fails.to(tl.int32), None, _MAX) > 0:
            start = tl.maximum(start - 1, 0)
            loss = _block_loss(absw, uh, tl.load(values_ptr + start), s2, BLOCK_B, True)[:, None]
            better = bound_fails & (loss <= best_loss)
            best_loss = tl.where(better, loss, best_loss)
            best_idx = tl.where(better, start, best_idx)
            gap = tl.maximum(m - _QMAX * (tl.load(values_ptr + tl.maximum(start - 1, 0)) * s2), 0.0)
            bound_fails = (start > 0) & ~(gap * gap > best_loss)
    # Above: the doubling argument needs a normal v[k0] (zero blocks score 0 at every code).
    subnormal = (k0 < FIRST_DOUBLING) & (m > 0)
    tiny = tl.full([BLOCK_B, 1], 0.0, tl.float32) + s2 < _TINY_S2  # a property of the whole tensor
    flag = tl.reshape(bound_fails | subnormal | tiny, [BLOCK_B]) & mask

    amax = tl.reshape(tl.load(cands_ptr + best_idx) * g, [BLOCK_B])
    tl.store(out_ptr + rows, amax, mask=mask & ~flag)
    _store_stats(code_ptr, old_ptr, part_ptr, part_stride, tl.program_id(0), rows,
                     tl.reshape(best_idx, [BLOCK_B]), tl.reshape(best_loss, [BLOCK_B]), mask & ~flag, False)  # fmt: skip
    _store_amax(part_ptr, part_stride, tl.reshape(m, [BLOCK_B]), g)
    # One atomic per flagged block (about 1 in 100): each gets its own slot in the list.
    slot = tl.atomic_add(count_ptr + tl.full([BLOCK_B], 0, tl.int32), 1, mask=flag, sem="relaxed")
    tl.store(work_ptr + slot, rows.to(tl.int32), mask=flag & (slot < n_blocks))


"""


def variant(name: str, unrolled: bool = False):
    """The variant module ``name`` ("library", "select", "fp32", "chain", "tile" or "divide"), written to a
    temporary file and imported; ``unrolled``: with the pruned window unrolled (the SASS counts
    compare that form)."""
    if name == "library":
        text = SOURCE
    elif name == "select":
        text = unpacked(SOURCE)
    elif name == "fp32":
        text = unpacked(SOURCE).replace("_argmin_lanes(absw, _odd_f16(u), s2,", "_argmin_lanes(absw, u, s2,")
        text = text.replace("_odd_f16(tl.math.div_rn(", "(tl.math.div_rn(")  # _decision_copies
        text = text.replace("    return h.to(tl.int16).to(tl.float16, bitcast=True)", "    return h")  # _f16
        text = text.replace("    if F16:", "    if False:")
        if text.count("    if False:") != 3 or "_odd_f16(u)," in text or "_odd_f16(tl.math" in text:
            raise RuntimeError("the library's decision code changed: update the fp32 variant")
    elif name == "divide":
        text = divided(SOURCE)
    elif name == "chain":
        i, j = SOURCE.index(TREE_START), SOURCE.index(TREE_END) + len(TREE_END)
        text = unpacked(SOURCE[:i] + CHAIN + SOURCE[j:])
    else:
        i = SOURCE.index("\ndef interpreted(")
        text = SOURCE[:i] + TILE + SOURCE[i:]
    if unrolled:
        loop = "    for i in range(N_WINDOW):"
        if loop not in text:
            raise RuntimeError("the library's window loop changed: update kernel_variants.py")
        text = text.replace(loop, "    for i in tl.static_range(N_WINDOW):")
    path = Path(tempfile.mkdtemp()) / f"sweep_variant_{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def unpacked(text: str) -> str:
    """``text`` with the pruned pass's packed path switched off (the interpreter's path on CUDA)."""
    for old in (
        "    if PACKED:\n        y = tl.math.div_rn",
        "    if PACKED:\n        t = _thresholds_f16x2",
    ):
        if text.count(old) != 1:
            raise RuntimeError("the library's packed path changed: update kernel_variants.py")
        text = text.replace(old, old.replace("if PACKED:", "if False:"))
    return text


# Session 8's packed pass, for the comparison of session 9: the decision copies made by a division
# per element (div.rn) and _odd_f16_bits' bit manipulation, and the 7 decisions of a pair added one
# by one to a sum that starts at 0 (14 packed operations per pair, not 13).
DIVIDED_COPIES = (
    "".join(f"        h{j} = _odd_f16_bits(tl.math.div_rn(a[{j}], s2))\n" for j in range(16))
    + "        u = ("
    + ", ".join(f"h{2 * i} | (h{2 * i + 1} << 16)" for i in range(8))
    + ")\n"
)
SUM_FROM_ZERO = """
_PAIR_ASM = tl.constexpr(
    "{ .reg .b32 q, c, w; .reg .b16 lo, hi; .reg .f32 m0, m1, e0, e1; mov.b32 q, 0; "
    + "".join(
        f"set.{'gt' if down else 'ge'}.f16x2.f16x2 c, $4, ${5 + k}; "
        + ("add.rn.f16x2 q, q, c; " if step == 1 else f"mov.b32 w, {_f16x2(step)}; fma.rn.f16x2 q, c, w, q; ")
        for k, ((_, down), step) in enumerate(zip(E2M1_MIDPOINTS, _STEPS, strict=True))
    )
    + _PAIR_ASM.value[_PAIR_ASM.value.index("mov.b32 {lo, hi}, q;"):]
)
"""


def divided(text: str) -> str:
    """``text`` with session 8's prologue and decision sums in the packed path (variant "divide")."""
    start = text.index("    if PACKED:\n        y = tl.math.div_rn")
    end = text.index("    else:  # one return", start)
    text = text[:start] + "    if PACKED:\n" + DIVIDED_COPIES + text[end:]
    anchor = "\n\n@triton.jit\ndef _odd_f16_bits(u):"
    if text.count(anchor) != 1:
        raise RuntimeError("the library's decision code changed: update the divide variant")
    return text.replace(anchor, "\n" + SUM_FROM_ZERO + anchor)


def pruned(module):
    return (
        module._sweep_pruned_tile_kernel
        if hasattr(module, "_sweep_pruned_tile_kernel")
        else module._sweep_pruned_kernel
    )


SIGNATURE = {"x_ptr": "*bf16", "values_ptr": "*fp32", "cands_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": "*fp32",
             "code_ptr": "*u8", "old_ptr": "*u8", "part_ptr": "*fp32", "part_stride": "i32", "work_ptr": "*i32",
             "count_ptr": "*i32", "n_blocks": "i32", "table_ptr": "*i32", "NUM_CANDIDATES": "constexpr",
             "FIRST_DOUBLING": "constexpr", "N_BELOW": "constexpr", "N_EXTRA": "constexpr", "PACKED": "constexpr",
             "WORDS": "constexpr", "BLOCK_B": "constexpr"}  # fmt: skip


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def compile_sm90(fn, signature: dict, constexprs: dict, options: dict):
    """``fn`` compiled for sm_90 by Triton's bundled compiler (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = [(i,) for i, (n, t) in enumerate(signature.items()) if t.startswith("*") or n == "n_blocks"]
    src = ASTSource(fn, signature, constexprs, {k: [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode with modifiers, operands)`` of every SASS instruction."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def first_loop(ins: list[tuple[int, str, str]]) -> tuple[int, int]:
    """(instructions before the first loop, instructions in its body): the first backward branch."""
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            return sum(a < start for a, _, _ in ins), sum(start <= a <= addr for a, _, _ in ins)
    raise RuntimeError("no loop found")


def sass_counts(fn, block_b: int, num_warps: int, maxnreg: int | None = None, words: bool = False):
    """SASS opcode counts of ``fn`` (a pruned kernel) compiled for sm_90, without a GPU, with the
    SASS instructions and the registers per thread: ``(Counter, instructions, registers)``;
    ``words``: the bf16 pass (``WORDS``)."""
    constexprs = {"NUM_CANDIDATES": 126, "FIRST_DOUBLING": ks.FIRST_DOUBLING, "N_BELOW": ks.N_BELOW,
                  "N_EXTRA": ks.N_EXTRA, "PACKED": True, "WORDS": words, "BLOCK_B": block_b}  # fmt: skip
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    # The arguments this kernel has (the "tile" variant predates the bf16 pass's table and WORDS).
    signature = {k: v for k, v in SIGNATURE.items() if k in fn.arg_names}
    kernel = compile_sm90(fn, signature, {k: v for k, v in constexprs.items() if k in fn.arg_names}, options)
    ins = sass_instructions(_cuobjdump(kernel.asm["cubin"], "-sass"))
    usage = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(kernel.asm["cubin"], "-res-usage"))
    return collections.Counter(op.split(".")[0] for _, op, _ in ins), ins, (int(usage[1]), int(usage[2]))


STATS_SIGNATURE = {"x_base": "*i16", "code_base": "*u8", "table_base": "*fp32", "meta_ptr": "*i64",
                   "meta_stride": "i32", "owner_ptr": "*i32", "stats_ptr": "*fp32", "stats_stride": "i32",
                   "ROWS": "constexpr", "TILES": "constexpr", "BF16": "constexpr"}  # fmt: skip
#: Opcodes that issue at half rate on sm_80/90 (compares, selects, min/max, logic): the pipe that
#: bound the stats pass and the select tree.
HALF_RATE = ("FSETP", "FSEL", "FSET", "FMNMX", "LOP3", "SEL", "HSETP2", "ISETP", "SHF", "PRMT")


def run_sass(stats_from: str | None = None) -> None:
    codes = ks.N_BELOW + 8 + ks.N_EXTRA  # unrolled: the window and both extra codes
    rows = [("library (packed, thread per block)", pruned(variant("library", True)), 256, 8, 16),
            ("select tree", pruned(variant("select", True)), 256, 8, 16),
            ("fp32 decisions", pruned(variant("fp32", True)), 256, 8, 16),
            ("chain", pruned(variant("chain", True)), 256, 8, 16),
            ("session 8 (divide)", pruned(variant("divide", True)), 256, 8, 16),
            ("tile ([B, 16], B32 w2)", pruned(variant("tile", True)), 32, 2, 8)]  # fmt: skip
    print(f"triton {triton.__version__}, sm_90 SASS of the pruned pass; {codes} codes unrolled")
    print(f"{'kernel':<34} {'instructions':>12} {'per element-code':>17}  top opcodes")
    for name, fn, block_b, warps, per_thread in rows:
        ops = sass_counts(fn, block_b, warps)[0]
        total = sum(ops.values())
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(4))
        print(f"{name:<34} {total:>12} {total / (codes * per_thread):>17.1f}  {top}")

    print("\nas the library runs it (window as a loop), B32 w1: instructions before the loop, per code")
    print("in the loop, registers per thread (and bytes of stack: spills)")
    for name, words in (("library", False), ("library", True), ("divide", False)):
        for cap in (None, 56, 48):
            _, ins, (regs, stack) = sass_counts(pruned(variant(name)), 32, 1, cap, words=words)
            before, body = first_loop(ins)
            label = "words" if words else name  # words: the library's bf16 pass (WORDS)
            print(
                f"  {label:<8} maxnreg={cap!s:<5} prologue {before:4d}, loop {body:4d}, {regs} registers, stack {stack}"
            )

    if (
        stats_from
    ):  # another version of fake_quant.py, e.g. `git show REV:src/nvfp4_qat/kernels/fake_quant.py`
        spec = importlib.util.spec_from_file_location("fake_quant_other", stats_from)
        fq = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = fq
        spec.loader.exec_module(fq)
    else:
        from nvfp4_qat.kernels import fake_quant as fq

    cfg = fq.STATS_CONFIG
    has_pairs = "PAIRS" in fq._stats_kernel.arg_names  # since session 10
    for pairs in (False, True) if has_pairs else (None,):
        signature = dict(STATS_SIGNATURE, **({"PAIRS": "constexpr"} if has_pairs else {}))
        constexprs = {"ROWS": cfg["ROWS"], "TILES": cfg.get("TILES", 1), "BF16": True}
        if has_pairs:
            constexprs["PAIRS"] = pairs
        kernel = compile_sm90(fq._stats_kernel, signature, constexprs, {"num_warps": cfg["num_warps"]})
        ins = sass_instructions(_cuobjdump(kernel.asm["cubin"], "-sass"))
        before, n = first_loop(ins)
        body = ins[before : before + n]
        per = cfg["ROWS"] * 16 / (32 * cfg["num_warps"])  # elements per thread and tile
        ops = collections.Counter(op.split(".")[0] for _, op, _ in body)
        half = sum(n for op, n in ops.items() if op in HALF_RATE)
        print(f"\nstats pass (_stats_kernel, bf16, {cfg}, PAIRS={pairs}): per element {len(body) / per:.1f} "
              f"instructions in the tile loop, {half / per:.1f} of them half-rate (HSET2 {ops['HSET2'] / per:.1f}, "
              "rate not counted); " + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))  # fmt: skip


def run_gpu() -> None:
    from triton.testing import do_bench

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    torch.manual_seed(0)
    x = torch.randn(8192, 4096, device=dev).to(torch.bfloat16)
    g = x.abs().max().float().reshape(1)
    bench = lambda fn: do_bench(fn, warmup=50, rep=500, return_mode="median")  # noqa: E731
    want, count = ks.launch_sweep(x, g, "pruned")[:2]
    want = want.clone()
    words = ks.words_pass(x.reshape(-1), "pruned")
    cfg = K.PRUNED_WORDS_CONFIG if words else K.PRUNED_CONFIG  # what launch_sweep picks
    print(f"library pruned (B{cfg.kwargs['BLOCK_B']} w{cfg.num_warps} maxnreg {cfg.maxnreg}, bf16 pass {words}): "
          f"{bench(lambda: ks.launch_sweep(x, g, 'pruned')):.4f} ms, "
          f"{int(count)} blocks to the second pass")  # fmt: skip
    capped = K.PRUNED_CONFIG  # the register cap of the pass without the bf16 pass
    run = lambda: ks.launch_sweep(x, g, "pruned", config=capped)  # noqa: E731
    print(
        f"library pruned, maxnreg {capped.maxnreg}: {bench(run):.4f} ms, equal: {torch.equal(run()[0], want)}"
    )
    # The variants predate the bf16 pass: they run with it off, as does the library's row "no bf16 pass".
    real_words_pass = ks.words_pass
    ks.words_pass = lambda *args: False
    try:
        run = lambda: ks.launch_sweep(x, g, "pruned")  # noqa: E731
        print(
            f"library pruned, no bf16 pass (session 9): {bench(run):.4f} ms, equal: {torch.equal(run()[0], want)}"
        )
        for name in ("divide", "select", "fp32", "chain"):  # ("tile" has no table argument: not timed)
            ks._k = variant(name)  # the launcher reads its kernels from this module
            try:
                run = lambda: ks.launch_sweep(x, g, "pruned")  # noqa: E731
                same = torch.equal(run()[0], want)
                print(f"{name} pruned: {bench(run):.4f} ms, equal: {same}")
            finally:
                ks._k = K
    finally:
        ks.words_pass = real_words_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", action="store_true", help="count SASS instructions (no GPU needed)")
    parser.add_argument("--stats-from", help="with --sass: count the stats kernel of this fake_quant.py")
    args = parser.parse_args()
    if args.sass:
        run_sass(args.stats_from)
    elif torch.cuda.is_available():
        run_gpu()
    else:
        sys.exit("no CUDA device: run with --sass, or on a GPU machine")


if __name__ == "__main__":
    main()
