"""The pruned sweep's bf16 pass (``WORDS``, sm_90): its table and its per-pair PTX, checked on the CPU.

The pass decides on the weight's bf16 pairs against x-space thresholds rounded up to bf16, made per
tensor by ``_sweep_table_kernel``; ``_WORDS_PAIR_ASM`` turns a pair's decisions into its two squared
errors. Here: the table kernel (under Triton's interpreter, and compiled on a GPU) equals
``format.decision_table`` with each threshold rounded up to bf16, bit for bit, over global amaxes across
the fp32 range; and the PTX text, executed by ``test_packed_pass.run_ptx``, gives exactly the
reference's squared error at every code for bf16 weights at, next to and between the thresholds. The
GPU tests of ``test_sweep_triton.py`` compare the compiled pass itself with the reference sweep.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvfp4_qat.format import decision_table, fp8_code_values, global_scale
from nvfp4_qat.kernels import _sweep_kernels as K
from nvfp4_qat.kernels.sweep import sweep_tables
from test_packed_pass import bf16_bits, reference_sq_err, run_ptx

#: Global amaxes: ordinary, tiny (subnormal thresholds), huge, zero.
GLOBAL_AMAXES = [1.0, 0.05, 2688.0, 3.3e-20, 2.0**-100, 2.0**-120, 2.0**-140, 1e30, 3.0e38, 0.0]
VALUES = fp8_code_values().numpy()


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def ceil_words(table: torch.Tensor) -> torch.Tensor:
    """``decision_table`` rows ``[..., 128, 8]`` as the pass's words: each threshold rounded up to bf16
    in both halves of an int32, then the scale's fp32 bits."""
    bits = table.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    up = (bits[..., :7] + 0xFFFF) >> 16
    words = (up << 16) | up
    return torch.cat([words, bits[..., 7:]], -1).to(torch.uint32).view(torch.int32)


def want_tables(g: torch.Tensor) -> torch.Tensor:
    return torch.stack([ceil_words(decision_table(global_scale(x))) for x in g]).reshape(len(g), -1)


def test_table_kernel_is_the_decision_table_rounded_up_to_bf16(interpret):
    g = torch.tensor(GLOBAL_AMAXES, dtype=torch.float32)
    got = sweep_tables(g)
    assert got.shape == (len(g), 128 * 8) and got.dtype == torch.int32
    assert torch.equal(got, want_tables(g))


@pytest.mark.gpu
def test_cuda_table_kernel_is_the_decision_table_rounded_up_to_bf16():
    gen = torch.Generator().manual_seed(0)
    random = torch.exp2(torch.rand(500, generator=gen, dtype=torch.float64) * 250 - 125).float()
    g = torch.cat([torch.tensor(GLOBAL_AMAXES, dtype=torch.float32), random])
    assert torch.equal(sweep_tables(g.cuda()).cpu(), want_tables(g))


def test_the_table_check_can_fail(interpret):
    g = torch.tensor([0.05])
    truncated = ceil_words(
        decision_table(global_scale(g[0])).view(torch.int32).__and__(-65536).view(torch.float32)
    )
    assert (truncated.reshape(1, -1) != sweep_tables(g)).sum() > 100  # rounding down is not the table


def probes(table: np.ndarray, n_random: int, seed: int) -> np.ndarray:
    """bf16 |w| (as float32) within 3 bf16 steps of every threshold of every row, and random ones."""
    t = table[:, :7].reshape(-1)
    ceil = bf16_bits(t[np.isfinite(t)]).astype(np.int64)
    near = (ceil[:, None] + np.arange(-3, 4)).reshape(-1)
    gen = np.random.default_rng(seed)
    bits = np.concatenate([near[(near >= 0) & (near < 0x7F80)], gen.integers(0, 0x7F80, n_random)])
    return np.unique(bits).astype(np.uint32) << 16


def mismatches(asm: str, g: float) -> tuple[int, int]:
    """(squared errors of bf16 probes that differ from the reference's, errors checked), at every code."""
    s2 = np.float32(global_scale(torch.tensor(g)).item())
    table = decision_table(torch.tensor(s2)).numpy()
    words = ceil_words(torch.from_numpy(table)).numpy().view(np.uint32)
    a = probes(table, 20_000, 1).view(np.float32)
    a = a[: a.size // 2 * 2]
    pair = (a[0::2].view(np.uint32) >> 16) | (a[1::2].view(np.uint32) & np.uint32(0xFFFF0000))
    with np.errstate(over="ignore"):
        u = (a / s2).astype(np.float32)  # the reference decides on fl(|w| / s2)
    bad = checked = 0
    for k, v in enumerate(VALUES):
        row = words[k + 1]  # code index k is FP8 byte k + 1
        t_words = [np.full(pair.shape, row[j], np.uint32) for j in range(7)]
        sv = np.full(pair.shape, row[7], np.uint32).view(np.float32)
        with np.errstate(over="ignore"):  # the largest probes square to inf, in both
            e0, e1 = run_ptx(asm, 2, [a[0::2], a[1::2], pair, *t_words, sv])
            want = reference_sq_err(a, u, v, s2)
        got = np.empty_like(a)
        got[0::2], got[1::2] = e0, e1
        bad += int((got.view(np.uint32) != want.view(np.uint32)).sum())
        checked += a.size
    return bad, checked


@pytest.mark.parametrize("g", [1.0, 0.05, 2688.0, 3.3e-20, 1e30])
def test_words_pair_asm_equals_the_reference_squared_errors_at_every_code(g):
    bad, checked = mismatches(K._WORDS_PAIR_ASM.value, g)
    assert checked > 126 * 15_000
    assert bad == 0, f"{bad} of {checked} squared errors differ from the reference"


def test_the_pair_check_can_fail():
    # The halves' magnitudes swapped, or the top step 1 instead of 2: both are caught.
    swapped = K._WORDS_PAIR_ASM.value.replace("$2, m0", "$3, m0").replace("$3, m1", "$2, m1")
    wrong_top = K._WORDS_PAIR_ASM.value.replace("0x40004000", "0x3f803f80")
    for asm in (swapped, wrong_top):
        assert asm != K._WORDS_PAIR_ASM.value
        assert mismatches(asm, 0.05)[0] > 1000
