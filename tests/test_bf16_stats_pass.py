"""The stats pass's bf16 pairs (``fake_quant._BF16_PAIR_ASM`` and ``_BF16_CEIL_ASM``: inline PTX that
only an sm_90 GPU runs) against the fp32 decision rule of the fake-quant kernels.

On the CPU the PTX text runs in ``test_packed_pass.run_ptx`` (a numpy emulator, instruction by
instruction); on a GPU the kernel's own helper ``_bf16_pair_magnitudes`` runs compiled. Both must give,
for every row of the decision table of several global scales (subnormal thresholds included), and
for bf16 values at, next to and between the thresholds (and NaN, Inf, subnormals, zero), exactly the
E2M1 magnitude that the fp32 comparisons ``|x| >= table[code, k]`` give, in both halves of a word.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from nvfp4_qat.format import E2M1_VALUES, decision_table
from nvfp4_qat.kernels import fake_quant as fq
from test_packed_pass import bf16_bits, bf16_halves, run_ptx

#: Global scales s2: ordinary ones, and tiny ones whose thresholds are fp32/bf16 subnormals.
S2 = [np.float32(v) for v in (1.0, 0.012345679, 2.0**-7 / 2688, 3.3e-20, 2.0**-118, 2.0**-133)]
STEPS = np.diff(np.asarray(E2M1_VALUES, np.float64))  # 0.5 x4, 1 x2, 2


def reference_q(a: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The fp32 rule of ``fake_quant._magnitude``: the format's steps over the thresholds passed."""
    with np.errstate(invalid="ignore"):
        passed = a[:, None].astype(np.float32) >= thresholds  # NaN passes none
    return (passed * STEPS).sum(axis=1).astype(np.float32)


def cases(s2: np.float32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(bf16 bits of |x| probes, the fp32 thresholds of each probe's table row [n, 7])``: for every
    row, the bf16 numbers within 3 of each of its thresholds, random bf16 numbers, and specials."""
    table = decision_table(torch.tensor(s2)).numpy()  # [128, 8]
    gen = np.random.default_rng(seed)
    specials = np.array([0, 1, 0x7F, 0x80, 0x7F7F, 0x7F80, 0x7FC0, 0x7FFF, 0x3F80], np.uint32)
    probes, rows = [], []
    for row in table:
        t = row[:7]
        ceil = bf16_bits(t).astype(np.int64)  # the nearest bf16; its neighbours cover the ceiling
        near = (ceil[:, None] + np.arange(-3, 4)).reshape(-1)
        near = near[(near >= 0) & (near <= 0x7F80)]
        random = gen.integers(0, 0x7F81, 64)
        p = np.concatenate([near, random, specials]).astype(np.uint32)
        probes.append(p)
        rows.append(np.broadcast_to(t, (p.size, 7)))
    return np.concatenate(probes), np.concatenate(rows)


def emulated(words: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q words, |x| words)`` of the PTX text, each word's thresholds made by ``_BF16_CEIL_ASM``."""
    t_words = [run_ptx(fq._BF16_CEIL_ASM.value, 1, [thresholds[:, k].view(np.uint32)])[0] for k in range(7)]
    return tuple(run_ptx(fq._BF16_PAIR_ASM.value, 2, [words, *t_words]))


@triton.jit
def _pairs_fn(w_ptr, t_ptr, q_ptr, a_ptr, n, BLOCK: tl.constexpr):
    # The stats pass's own helper on [BLOCK, 1] words, each with its own 7 thresholds.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    words = tl.load(w_ptr + i, mask=m, other=0)[:, None]
    t0 = tl.load(t_ptr + i * 7, mask=m, other=0.0)
    t1 = tl.load(t_ptr + i * 7 + 1, mask=m, other=0.0)
    t2 = tl.load(t_ptr + i * 7 + 2, mask=m, other=0.0)
    t3 = tl.load(t_ptr + i * 7 + 3, mask=m, other=0.0)
    t4 = tl.load(t_ptr + i * 7 + 4, mask=m, other=0.0)
    t5 = tl.load(t_ptr + i * 7 + 5, mask=m, other=0.0)
    t6 = tl.load(t_ptr + i * 7 + 6, mask=m, other=0.0)
    q, a = fq._bf16_pair_magnitudes(words, t0, t1, t2, t3, t4, t5, t6)
    tl.store(q_ptr + i[:, None], q, mask=m[:, None])
    tl.store(a_ptr + i[:, None], a, mask=m[:, None])


def compiled(words: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = torch.from_numpy(words.view(np.int32).copy()).cuda()
    t = torch.from_numpy(np.ascontiguousarray(thresholds, np.float32)).cuda()
    q, a = torch.empty_like(w), torch.empty_like(w)
    _pairs_fn[(triton.cdiv(w.numel(), 1024),)](w, t, q, a, w.numel(), BLOCK=1024)
    return q.cpu().numpy().view(np.uint32), a.cpu().numpy().view(np.uint32)


def check(s2: np.float32, run) -> int:
    """Words checked; asserts every q and |x| half equals the fp32 rule's."""
    probes, thresholds = cases(s2)
    gen = np.random.default_rng(1)
    partner = gen.permutation(probes.size)  # each probe in the low half, and in the high half
    signs = gen.integers(0, 2, (2, probes.size)).astype(np.uint32) << 15  # |x| must drop them
    lo_words = probes | signs[0] | ((probes[partner] | signs[1]) << 16)
    hi_words = probes[partner] | signs[1] | ((probes | signs[0]) << 16)
    words = np.concatenate([lo_words, hi_words])
    t = np.concatenate([thresholds, thresholds])  # the low half's row (the partner shares it)
    q, a = run(words, t)
    q_lo, q_hi = bf16_halves(q)
    a_lo, a_hi = bf16_halves(a)
    x_lo, x_hi = bf16_halves(words & np.uint32(0x7FFF7FFF))
    np.testing.assert_array_equal(a.view(np.uint32), (words & np.uint32(0x7FFF7FFF)).astype(np.uint32))
    for got, x in ((q_lo, x_lo), (q_hi, x_hi)):
        want = reference_q(x, t)
        bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
        assert bad.size == 0, f"s2={s2}: {bad.size} magnitudes differ, e.g. |x|={x[bad[0]]!r} {t[bad[0]]}"
    assert np.isnan(a_lo).sum() > 100 and np.isnan(a_hi).sum() > 100  # NaN probes were among them
    return words.size


@pytest.mark.parametrize("s2", S2, ids=lambda v: f"{float(v):.3g}")
def test_bf16_pairs_decide_like_fp32_emulated(s2):
    assert check(s2, emulated) > 2 * 128 * 100


@pytest.mark.gpu
@pytest.mark.parametrize("s2", S2, ids=lambda v: f"{float(v):.3g}")
def test_bf16_pairs_decide_like_fp32_on_the_gpu(s2):
    if not fq.bf16_pairs(torch.device("cuda")):
        pytest.fail("the bf16 pairs need an sm_90 GPU (set.bf16x2); this GPU takes the fp32 path")
    assert check(s2, compiled) > 2 * 128 * 100


def test_ceiling_words_are_the_next_bf16_at_or_above():
    # Every threshold of the tables (subnormal, normal, +inf, 0): the word's halves are the least
    # bf16 >= the threshold.
    t = np.concatenate([decision_table(torch.tensor(s2)).numpy()[:, :7].reshape(-1) for s2 in S2])
    t = np.concatenate([t, np.float32([0.0, 2.0**-149, 3.0e38, 3.4028235e38, np.inf])])
    lo, hi = bf16_halves(run_ptx(fq._BF16_CEIL_ASM.value, 1, [t.view(np.uint32)])[0])
    np.testing.assert_array_equal(lo.view(np.uint32), hi.view(np.uint32))
    assert (lo >= t).all()
    below = (lo.view(np.uint32) - np.uint32(0x10000)).view(np.float32)  # the bf16 below each
    assert (below[lo > 0] < t[lo > 0]).all()
    assert (t < 2.0**-126).sum() > 100  # subnormal thresholds were among them


def test_the_check_can_fail():
    # A strict comparison, or the top step 1 instead of 2: both are caught.
    probes, thresholds = cases(np.float32(0.012345679))
    t_words = [run_ptx(fq._BF16_CEIL_ASM.value, 1, [thresholds[:, k].view(np.uint32)])[0] for k in range(7)]
    want = reference_q(bf16_halves(probes)[0], thresholds)
    for asm in (fq._BF16_PAIR_ASM.value.replace("set.ge.", "set.gt."),
                fq._BF16_PAIR_ASM.value.replace("0x40004000", "0x3f803f80")):  # fmt: skip
        assert asm != fq._BF16_PAIR_ASM.value
        q = bf16_halves(run_ptx(asm, 2, [probes, *t_words])[0])[0]
        assert (q != want).sum() > 500
