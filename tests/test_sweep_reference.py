"""Reference scale sweep against the naive definition, on random and adversarial blocks."""

import pytest
import torch

import naive
from nvfp4_qat import _sweep_reference as ref
from nvfp4_qat import fake_quantize_nvfp4, fp8_scale_candidates, nvfp4_scale_sweep
from nvfp4_qat.format import block_codes, fp8_code_values, global_scale

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sweep(x, g, **kw):
    return nvfp4_scale_sweep(x, g, backend="reference", **kw)


def adversarial_blocks(gen: torch.Generator) -> torch.Tensor:
    """(n, 16) fp32 blocks that stress the sweep; the first block holds the global max."""
    rows = [
        torch.randn(16, generator=gen) * 4,  # holds the global max (set below)
        torch.full((16,), 0.3),  # all equal
        torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6] * 2) * 0.25,  # already on an FP4 grid
        torch.zeros(16).index_fill_(0, torch.tensor([5]), 0.7),  # a single non-zero
        torch.zeros(16),  # all zeros
        torch.randn(16, generator=gen) * 1e-5,  # 1e5x below the tensor max: FP8-subnormal scale
        torch.randn(16, generator=gen) * 3e-6,  # deep in the subnormal range
        torch.distributions.StudentT(1.5).sample((16,)) * 0.1,  # heavy tails
        torch.tensor([1e-4] * 15 + [0.9]),  # one outlier
    ]
    blocks = torch.stack(rows)
    blocks[0, 3] = 10.0
    return blocks


def _check_against_naive(x: torch.Tensor, g: torch.Tensor) -> None:
    got = sweep(x, g)
    amax, winners = naive.sweep(x.float().flatten().tolist(), float(g))
    want = torch.tensor(amax, dtype=torch.float32)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} blocks differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_sweep_matches_naive_on_random_blocks(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 64, generator=gen) * 0.05).to(dtype)
    _check_against_naive(x, x.float().abs().max())


def test_sweep_matches_naive_on_adversarial_blocks():
    gen = torch.Generator().manual_seed(1)
    x = adversarial_blocks(gen)
    _check_against_naive(x, x.abs().max())


def test_sweep_picks_fp8_subnormal_codes_for_tiny_blocks():
    gen = torch.Generator().manual_seed(2)
    x = adversarial_blocks(gen)
    g = x.abs().max()
    codes = block_codes(sweep(x, g), global_scale(g))
    assert codes[5].item() < 2.0**-6 and codes[6].item() < 2.0**-6  # subnormal E4M3 range
    assert codes[4].item() == 2.0**-9  # all zeros: every loss is 0, the smallest code wins


def test_sweep_best_score_is_fake_quant_error_and_is_minimal():
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([adversarial_blocks(gen), torch.randn(40, 16, generator=gen)]).to(torch.float32)
    g = x.abs().max()
    best = sweep(x, g)
    s2 = global_scale(g)
    absw = x.abs()
    u = absw / s2
    # the sweep's score at the chosen code == squared error of fake_quantize_nvfp4 at the returned amax
    chosen = block_codes(best, s2)
    err = (absw - fake_quantize_nvfp4(x, best, g).abs()) ** 2
    fq_loss = ref.pairwise_block_sum(err)
    losses = torch.stack([ref.block_losses(absw, u, v, s2) for v in fp8_code_values()])  # (126, n)
    at_chosen = losses.gather(
        0, (chosen.unsqueeze(0) == fp8_code_values().unsqueeze(1)).int().argmax(0, keepdim=True)
    )
    assert torch.equal(at_chosen[0], fq_loss)
    # and no candidate does strictly better; ties resolved to the first minimum
    assert torch.equal(fq_loss, losses.min(0).values)
    first_min = losses.argmin(0)  # torch returns the first minimal index
    assert torch.equal(best, fp8_scale_candidates()[first_min] * g)


def test_pairwise_tree_order():
    vals = torch.tensor([[1e8, 1.0, -1e8, 1.0] + [0.0] * 12])
    # ((1e8 + 1) + (-1e8 + 1)) + 0 ... = 0 in fp32, while a left-to-right sum gives 1
    assert ref.pairwise_block_sum(vals).item() == naive.tree_sum(vals[0].tolist()) == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_sweep_output_contract(dtype):
    x = torch.randn(2, 3, 48).to(dtype)
    out = sweep(x, x.float().abs().max())
    assert out.shape == (18,) and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all() and (out > 0).all()


def test_sweep_non_contiguous_and_3d_equal_contiguous():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(64, 48, generator=gen)
    x = base.t()  # (48, 64), non-contiguous
    g = x.abs().max()
    assert torch.equal(sweep(x, g), sweep(x.contiguous(), g))
    x3 = torch.randn(2, 5, 32, generator=gen)
    assert torch.equal(sweep(x3, x3.abs().max()), sweep(x3.reshape(10, 32), x3.abs().max()))


def test_sweep_zero_global_amax_gives_zero_scales():
    out = sweep(torch.zeros(4, 32), 0.0)
    assert torch.equal(out, torch.zeros(8))


def test_sweep_chunking_does_not_change_results(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 16, generator=gen)
    whole = sweep(x, x.abs().max())
    monkeypatch.setattr(ref, "MEMORY_FLOOR_BYTES", 0)
    monkeypatch.setattr(ref, "BYTES_PER_BLOCK", 512 * 5)  # 7 chunks, the last one partial
    assert ref.chunk_blocks(x, 300, 16) == 14
    assert torch.equal(sweep(x, x.abs().max()), whole)


def _peak_cpu_bytes(fn) -> int:
    """Peak of live CPU allocations made inside fn, from the profiler's memory accounting: each
    op's own allocations (self_cpu_memory_usage) and the frees it records as "[memory]" events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_sweep_extra_memory_is_bounded(monkeypatch):
    """Measured: the extra memory stays under max(2 * input bytes, floor). With the floor lowered
    to 0, a 256 KiB fp32 input may use 512 KiB; 126 losses per block would need 2 MiB."""
    monkeypatch.setattr(ref, "MEMORY_FLOOR_BYTES", 0)
    x = torch.randn(64, 1024)  # 4,096 blocks, 256 KiB
    g = x.float().abs().max()
    peak = _peak_cpu_bytes(lambda: sweep(x, g))
    bound = 2 * x.numel() * x.element_size()
    assert 0 < peak <= bound, f"peak {peak / 2**20:.2f} MiB > bound {bound / 2**20:.2f} MiB"
    naive_losses = 126 * 4 * x.numel() // 16
    assert peak * 4 < naive_losses


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_reference_sweep_cuda_bit_identical_to_cpu(dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.cat([adversarial_blocks(gen), torch.randn(4000, 16, generator=gen) * 0.02]).to(dtype)
    g = x.float().abs().max()
    cpu = sweep(x, g)
    torch.cuda.reset_peak_memory_stats()
    gpu = sweep(x.cuda(), g.cuda()).cpu()
    assert torch.equal(cpu, gpu), f"{(cpu != gpu).sum().item()} blocks differ"


@pytest.mark.gpu
def test_reference_sweep_cuda_memory_bound():
    x = torch.randn(8192, 4096, device="cuda").to(torch.bfloat16)  # 64 MiB
    g = x.float().abs().max()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    nvfp4_scale_sweep(x, g, backend="reference")
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= max(2 * x.numel() * x.element_size(), 256 * 2**20), extra / 2**20
