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
    monkeypatch.setattr(ref, "CHUNK_BLOCKS", 14)  # 22 chunks, the last one partial
    assert ref.chunk_blocks(x, 300, 16) == 14
    assert torch.equal(sweep(x, x.abs().max()), whole)


def test_chunk_blocks_respects_the_memory_budget(monkeypatch):
    monkeypatch.setattr(ref, "MEMORY_FLOOR_BYTES", 0)
    monkeypatch.setattr(ref, "CHUNK_BLOCKS", 10**9)
    x = torch.randn(64, 1024)  # 4,096 blocks, 256 KiB: a budget of 512 KiB
    table = ref._interval_tables(x.device)[1].numel() * 4
    want = (2 * x.numel() * 4 - 8 * 4096 - table) // ref.BYTES_PER_BLOCK
    assert ref.chunk_blocks(x, 4096, 16) == want and 1 < want < 4096
    monkeypatch.setattr(ref, "MEMORY_FLOOR_BYTES", 256 * 2**20)
    assert ref.chunk_blocks(x, 4096, 16) == 4096


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
    to 0 and no chunk cap, a 256 KiB fp32 input may use 512 KiB; the 126 losses of every block at
    once would need 8 MiB."""
    monkeypatch.setattr(ref, "MEMORY_FLOOR_BYTES", 0)
    monkeypatch.setattr(ref, "CHUNK_BLOCKS", 10**9)
    x = torch.randn(64, 1024)  # 4,096 blocks, 256 KiB
    g = x.float().abs().max()
    ref._interval_tables(x.device)  # the constant table, built once per process
    peak = _peak_cpu_bytes(lambda: sweep(x, g))
    bound = 2 * x.numel() * x.element_size()
    assert 0 < peak <= bound, f"peak {peak / 2**20:.2f} MiB > bound {bound / 2**20:.2f} MiB"
    all_losses = 126 * 4 * x.numel()
    assert peak * 16 < all_losses
    # and per block of a chunk the temporaries stay within BYTES_PER_BLOCK
    step = ref.chunk_blocks(x, 4096, 16)
    table = ref._interval_tables(x.device)[1].numel() * 4
    assert (peak - table - 8 * 4096) / step <= ref.BYTES_PER_BLOCK


# The sweep as it was up to 52e2dc7: a Python loop over the 126 candidates with a running strict
# minimum. The vectorised reference must return the same bits on every input.
def _loop_sweep(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    blocks = x.reshape(-1, block_size).to(torch.float32).abs()
    s2 = global_scale(global_amax)
    u = blocks / s2
    best = torch.full((blocks.shape[0],), float("inf"))
    best_idx = torch.zeros(blocks.shape[0], dtype=torch.int64)
    for k, v in enumerate(fp8_code_values()):
        loss = ref.block_losses(blocks, u, v, s2)
        better = loss < best  # strict: the first minimum wins
        best = torch.where(better, loss, best)
        best_idx.masked_fill_(better, k)
    return fp8_scale_candidates()[best_idx] * global_amax.reshape(()).to(torch.float32)


def _hard_inputs(seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 256, generator=gen) * 0.02
    x[0] = 0.0  # all-zero blocks: every code ties at loss 0
    x[1, :128] = 0.3  # constant blocks
    x[2] = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6] * 32) * 0.01  # on an FP4 grid: exact ties
    x[3] *= 1e-5  # FP8-subnormal scales
    x[4] *= 3e-7
    x[5] = torch.distributions.StudentT(1.5).sample((256,)) * 0.02  # heavy tails
    x[6, ::16] = 1.0  # one outlier per block
    x[7] = torch.randint(-3, 4, (256,), generator=gen) * 0.125  # few distinct values: many ties
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("seed", range(6))
def test_vectorised_sweep_equals_candidate_loop(dtype, seed, monkeypatch):
    monkeypatch.setattr(ref, "CHUNK_BLOCKS", 96)  # several chunks, the last one partial (640 blocks)
    x = _hard_inputs(seed, dtype)
    gs = [x.float().abs().max(), x.float().abs().max() * 3.5, torch.tensor(1e-30)]  # g above, far above
    for g in gs:
        got, want = sweep(x, g), _loop_sweep(x, g)
        assert torch.equal(got, want), f"g={g.item():g}: {(got != want).sum().item()} of {got.numel()} differ"


def test_vectorised_sweep_equals_candidate_loop_on_every_code():
    # Blocks built from each code's own grid and its midpoints, scaled so every code wins somewhere.
    values = fp8_code_values()
    g = torch.tensor(2688.0)  # s2 = 1: u == |w|
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 6])
    x = (values[:, None] * grid[None]).reshape(-1)
    x = torch.cat([x, torch.nextafter(x, torch.tensor(0.0)), torch.nextafter(x, torch.tensor(1e9))])
    got, want = sweep(x, g), _loop_sweep(x, g)
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} blocks differ"
    assert len(set(block_codes(got, global_scale(g)).tolist())) >= 90  # most codes won a block


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_reference_sweep_issues_a_bounded_number_of_ops():
    """A handful of large operations per chunk, none per candidate (the loop issued ~3,800)."""
    x = torch.randn(64, 64)  # 256 blocks: one chunk
    g = x.abs().max()
    sweep(x, g)  # build the constant table outside the count
    with _CountOps() as one_chunk:
        ref.sweep_reference(x, g)
    assert one_chunk.ops <= 50, one_chunk.ops  # views and the per-call constants included
    x4 = torch.randn(256, 64)  # 4 chunks
    with _CountOps() as four_chunks:
        ref.sweep_reference(x4, x4.abs().max())
    per_chunk = (four_chunks.ops - one_chunk.ops) / 3
    assert per_chunk <= 32, per_chunk  # 13 computations, the rest views and slices
    with _CountOps() as loop:
        _loop_sweep(x, g)
    assert loop.ops > 50 * one_chunk.ops, (loop.ops, one_chunk.ops)


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
