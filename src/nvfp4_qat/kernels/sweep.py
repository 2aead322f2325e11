"""Launcher of the Triton NVFP4 scale-sweep kernels (see ``_sweep_kernels`` for the math).

``sweep_triton`` is the validated launcher for direct use; :func:`nvfp4_qat.nvfp4_scale_sweep` (after
its own validation) and recalibration (with its statistics and buffers) call :func:`launch_sweep`. The
result is bit-identical to the reference sweep for both methods.
"""

from __future__ import annotations

import typing

import torch
import triton

from nvfp4_qat._backend import launch_device, require_triton
from nvfp4_qat._validation import METHODS, check_choice, check_x
from nvfp4_qat.format import BLOCK_SIZE, fp8_code_values, fp8_scale_candidates
from nvfp4_qat.kernels import _sweep_kernels as _k
from nvfp4_qat.kernels._launch import launch
from nvfp4_qat.kernels.fake_quant import bf16_pairs

#: Codes scored below ``k0`` by the pruned kernel (with the 8 from ``k0`` up: 11 of 126). On a
#: random bf16 8192x4096 weight the saturation bound then fails for 0.9% of the blocks (16% with 2).
N_BELOW = 3
#: Codes further below that a tile scores only when one of its blocks still needs them: with 2, none
#: of that weight's blocks is left to the second pass (18,011 without); both passes 0.46 -> 0.40 ms.
N_EXTRA = 2
_INT32_MAX = 2**31 - 1
#: Rows of the partials buffer: loss sums, changed-byte counts, max |x| (see ``launch_sweep``).
STATS_ROWS = 3
AMAX_SLOTS = _k.AMAX_SLOTS.value
#: Tile of the exhaustive and work-list kernels under Triton's CPU interpreter (see ``_launch``).
INTERPRETER_CONFIG = triton.Config({"BLOCK_B": 1024}, num_warps=4)
#: Largest tile of the pruned pass under the interpreter (see ``_interpreter_pruned_config``).
INTERPRETER_PRUNED_TILE = 16384

_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_num_sms: dict[int, int] = {}


def _candidate_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 code values and scale candidates (both ``[126]`` fp32) on ``device``, cached."""
    if device not in _tables:
        _tables[device] = (fp8_code_values(device), fp8_scale_candidates(device))
    return _tables[device]


def first_doubling_index(values: torch.Tensor) -> int:
    """The first ``k`` from which ``values[j + 8] == 2 * values[j]`` for every ``j >= k``.

    Above it (the FP8 normal range) halving a candidate gives the candidate 8 places below, which
    the pruned kernel's doubling argument needs; derived from the table, not restated.
    """
    doubles = values[8:] == 2 * values[:-8]
    failing = torch.nonzero(~doubles).flatten()
    return int(failing.max()) + 1 if failing.numel() else 0


FIRST_DOUBLING = first_doubling_index(fp8_code_values())


def _check_inputs(x: object, global_amax: object, method: object) -> None:
    """Refuse what the kernels cannot take (``ValueError``/``TypeError`` naming the argument); the
    device rule is :func:`~nvfp4_qat._backend.resolve_backend`'s. Reads nothing back from the GPU."""
    check_choice(method, METHODS, "method")
    check_x(x, BLOCK_SIZE)
    x = typing.cast(torch.Tensor, x)
    require_triton(x.device, "the Triton sweep kernel (x)")
    if x.numel() // BLOCK_SIZE > _INT32_MAX:
        raise ValueError(f"x must hold fewer than 2**31 blocks, got {x.numel() // BLOCK_SIZE}")
    if not isinstance(global_amax, torch.Tensor) or global_amax.numel() != 1:
        raise TypeError("global_amax must be a one-element tensor (validated by nvfp4_scale_sweep)")
    if global_amax.device != x.device:
        raise ValueError(
            f"x and global_amax must be on the same device, got {x.device} and {global_amax.device}"
        )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jitted function: ~8 us of host time per call from Python


# The smallest first-pass tile of any config: the partials buffer has a column per program of it.
_SMALLEST_TILE = min(
    c.kwargs["BLOCK_B"] for c in (*_k.EXHAUSTIVE_CONFIGS, *_k.PRUNED_CONFIGS, INTERPRETER_CONFIG)
)


def stats_slots(n_blocks: int) -> int:
    """Columns of the partial-sum buffer for ``n_blocks``: one per program of the smallest tile,
    plus the work list's shared slot (the last), and at least ``AMAX_SLOTS + 2`` (row 2)."""
    return max(_cdiv(n_blocks, _SMALLEST_TILE), AMAX_SLOTS + 1) + 1


def check_values(partials: torch.Tensor) -> torch.Tensor:
    """A launch's input checks (a view of ``AMAX_SLOTS + 1`` values of row 2 of its partials): the
    maximum of all but the last is max |x| (+inf where ``x`` holds NaN or Inf, 0 when the global
    amax is NaN or Inf), the last the global amax. ``nvfp4_scale_sweep`` reads them once, after the
    launch; ``nvfp4_scale_sweep_ex`` encodes them on the device (:func:`launch_info`)."""
    return partials[2, : AMAX_SLOTS + 1]


#: One program of one warp: the info kernel reads AMAX_SLOTS + 1 values.
INFO_CONFIG = triton.Config({}, num_warps=1)
#: One program of four warps per table (128 x 8 words).
TABLE_CONFIG = triton.Config({}, num_warps=4)


def launch_info(checks: torch.Tensor) -> torch.Tensor:
    """The input checks of a launch (:func:`check_values`) as ``nvfp4_scale_sweep_ex``'s ``info``
    code: a 0-dim int32 tensor on their device, from one launch of ``_sweep_info_kernel``, no sync."""
    info = torch.empty((), dtype=torch.int32, device=checks.device)
    with launch_device(checks.device):
        _launch("_sweep_info_kernel", checks.device, (1,), checks, info, config=INFO_CONFIG)
    return info


def sweep_tables(g: torch.Tensor) -> torch.Tensor:
    """The bf16 pass's tables (``_sweep_table_kernel``) of global amaxes ``g`` (fp32 ``[T]`` on one
    device): int32 ``[T, 128 * 8]``, one launch, no host sync. Recalibration makes all of them at
    once; ``launch_sweep`` makes its own when not given one."""
    values, _ = _candidate_tables(g.device)
    out = torch.empty(g.numel(), 128 * _k.TABLE_ROW.value, dtype=torch.int32, device=g.device)
    with launch_device(g.device):
        _launch("_sweep_table_kernel", g.device, (g.numel(),), g.reshape(-1), values, out,
                NUM_CANDIDATES=values.numel(), config=TABLE_CONFIG)  # fmt: skip
    return out


def words_pass(flat: torch.Tensor, method: str) -> bool:
    """Whether ``launch_sweep`` scores the contiguous ``flat`` with the bf16 pass (``WORDS``: the pruned
    method on bf16 weights on an NVIDIA GPU of compute capability 9.0 or newer, read as 32-bit words,
    so from a 4-byte aligned address); the same result either way."""
    return (
        method == "pruned"
        and flat.dtype == torch.bfloat16
        and flat.data_ptr() % 4 == 0
        and bf16_pairs(flat.device)
    )


def _grid(n_blocks: int):
    return lambda meta: (_cdiv(n_blocks, meta["BLOCK_B"]),)


#: The tile each kernel runs with on CUDA unless a caller pins another (see ``_sweep_kernels``:
#: fixed configs, so a process's first call compiles or loads one kernel and runs no trials). The
#: pruned kernel's bf16 pass takes ``_k.PRUNED_WORDS_CONFIG`` instead (``launch_sweep``).
DEFAULT_CONFIGS = {
    "_sweep_exhaustive_kernel": _k.EXHAUSTIVE_CONFIG,
    "_sweep_pruned_kernel": _k.PRUNED_CONFIG,
}


def _launch(name: str, device: torch.device, grid, *args, config: triton.Config | None = None, **kwargs):
    """Run kernel ``name`` compiled (CUDA) or interpreted, with ``config`` or its default tile."""
    kernel = getattr(_k, name)
    if device.type != "cuda":
        # The interpreter runs programs one after another and vectorises inside one with numpy,
        # so the largest tile is fastest (1024 blocks, exhaustive: 0.4 s at 1024, 3.3 s at 128).
        config = config or INTERPRETER_CONFIG
        kernel = _k.interpreted(name)
    else:
        config = config or DEFAULT_CONFIGS[name]
    meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if getattr(config, "maxnreg", None) is not None and device.type == "cuda":  # a register cap
        meta["maxnreg"] = config.maxnreg
    launch(kernel, grid, *args, **kwargs, **meta, enable_fp_fusion=False)


def _interpreter_pruned_config(n_blocks: int) -> triton.Config:
    # The pruned pass holds one [B] vector per element, and numpy's cost per operation wants long
    # vectors (512x4096 weight: 2.8 s at B = 32768, 38 s at 1024), but a tile costs its full size
    # whatever it holds: the next power of two of the block count, up to INTERPRETER_PRUNED_TILE.
    return triton.Config({"BLOCK_B": min(INTERPRETER_PRUNED_TILE, max(32, triton.next_power_of_2(n_blocks)))})


def _worklist_programs(x: torch.Tensor, n_blocks: int) -> int:
    # Persistent grid on CUDA: enough programs to fill the GPU, at most one per possible tile.
    tiles = _cdiv(n_blocks, _k.WORKLIST_CONFIG.kwargs["BLOCK_B"])
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _num_sms:
        _num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(tiles, 4 * _num_sms[index]))


def launch_sweep(
    x: torch.Tensor,
    global_amax: torch.Tensor,
    method: str = "pruned",
    config: triton.Config | None = None,
    n_below: int = N_BELOW,
    n_extra: int = N_EXTRA,
    stats: bool = False,
    buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
    """Launch the kernels on validated input; also return the pruned pass's flagged-block count.

    Args:
        x: CUDA (or, under the interpreter, CPU) tensor, last dim divisible by 16.
        global_amax: one-element tensor on ``x``'s device. If it is NaN or Inf the launch does
            nothing: no block is read, ``out`` and ``codes`` keep their contents, the count stays 0
            and the partial sums are 0 (recalibration's way to skip a non-finite weight without
            a host sync).
        method: ``"pruned"`` or ``"exhaustive"``.
        config: pin a tile config (default: ``DEFAULT_CONFIGS``; tests cover every tile size).
        n_below, n_extra: the pruned window's depth below ``k0`` (tests shrink it to force the
            bound and the second pass; any value gives the same result).
        stats: count changed bytes against ``buffers["old"]`` (required; without it the row of
            counts is meaningless).
        buffers: preallocated inputs, outputs and scratch on x's device: ``old`` (uint8
            ``[n_blocks]``, the previous scales' bytes), any of ``out`` (fp32 ``[n_blocks]``, e.g. a
            layer's ``block_amax`` viewed flat), ``codes``, ``partials`` (fp32 ``[3, >=
            stats_slots(n_blocks)]``, zeroed), ``count`` (int32 ``[1]``, zeroed), ``work`` (int32,
            ``>= n_blocks``; may be shared by launches on one stream) and ``table`` (the bf16 pass's
            :func:`sweep_tables` row of ``global_amax``; made here when missing).

    Returns:
        ``(block_amax [n_blocks] fp32, n_flagged [1] int32 or None for "exhaustive",
        (codes, partials))``: each block's FP8 byte (uint8), and per-program partial rows:
        ``partials[0].sum()`` is the loss (the reference's scores of the winning codes),
        ``partials[1].sum()`` the number of bytes that differ from ``old`` (with ``stats``), and
        :func:`check_values` gives the public sweep's input check (max |x| and the global
        amax) from row 2.
    """
    flat = x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)
    n_blocks = flat.numel() // BLOCK_SIZE
    values, cands = _candidate_tables(x.device)
    g = global_amax.detach().reshape(1).to(torch.float32)
    buf = buffers or {}
    out = buf.get("out")
    out = torch.empty(n_blocks, dtype=torch.float32, device=x.device) if out is None else out
    # The kernels always write the statistics (one compiled kernel serves every caller: a second
    # variant cost ~15 s of compiling and autotuning in a recipe run).
    codes = buf.get("codes")
    codes = torch.empty(n_blocks, dtype=torch.uint8, device=x.device) if codes is None else codes
    old = buf["old"] if stats else codes  # read after the code is stored: 0 changed
    part = buf.get("partials")
    if part is not None and (
        part.dtype != torch.float32
        or part.device != x.device
        or part.dim() != 2
        or part.shape[0] != STATS_ROWS
        or part.shape[1] < stats_slots(n_blocks)
    ):  # the kernels write every row (row 2 too), unchecked: a smaller buffer would be overrun
        raise ValueError(
            f"buffers['partials'] must be fp32 [{STATS_ROWS}, >= {stats_slots(n_blocks)}] on {x.device}, "
            f"got {part.dtype} {list(part.shape)} on {part.device}"
        )
    spare = None
    if part is None:  # zeroed: added to (the work list's column, max |x|) or left unwritten
        # (columns past the programs of a tile larger than the smallest). One more zeroed word is
        # the work list's count (0.0 has the bits of int32 0): one fill launch, not two.
        slots = stats_slots(n_blocks)
        scratch = torch.zeros(STATS_ROWS * slots + 1, dtype=torch.float32, device=x.device)
        part, spare = scratch[:-1].view(STATS_ROWS, slots), scratch[-1:].view(torch.int32)
    stride, acc_slot = part.stride(0), part.shape[1] - 1
    tables = (flat, values, cands, g, out, codes, old, part, stride)  # the arguments every kernel starts with
    extra = (codes, part)
    n_cand = values.numel()
    on_cuda = x.device.type == "cuda"
    with launch_device(x.device):
        if method == "exhaustive":
            _launch("_sweep_exhaustive_kernel", x.device, _grid(n_blocks), *tables, n_blocks,
                    NUM_CANDIDATES=n_cand, config=config)  # fmt: skip
            return out, None, extra
        count = buf.get("count")
        if count is None:
            count = spare if spare is not None else torch.zeros(1, dtype=torch.int32, device=x.device)
        work = buf.get("work")
        work = torch.empty(n_blocks, dtype=torch.int32, device=x.device) if work is None else work
        if config is None and not on_cuda:
            config = _interpreter_pruned_config(n_blocks)
        words = words_pass(flat, method)
        table = (buf["table"] if "table" in buf else sweep_tables(g)) if words else values
        if words and config is None:
            config = _k.PRUNED_WORDS_CONFIG
        _launch("_sweep_pruned_kernel", x.device, _grid(n_blocks), *tables, work, count, n_blocks, table,
                NUM_CANDIDATES=n_cand, FIRST_DOUBLING=FIRST_DOUBLING, N_BELOW=n_below,
                N_EXTRA=n_extra, PACKED=on_cuda and torch.version.hip is None,  # inline PTX: NVIDIA only
                WORDS=words, config=config)  # fmt: skip
        wl = _k.WORKLIST_CONFIG
        if on_cuda:
            grid = (_worklist_programs(x, n_blocks),)
        else:  # the interpreter gets one tile per program (a host sync costs nothing there)
            grid = (_cdiv(int(count), wl.kwargs["BLOCK_B"]),)
        if grid[0]:
            _launch("_sweep_worklist_kernel", x.device, grid, *tables, acc_slot, work, count, NUM_CANDIDATES=n_cand,
                    PERSISTENT=on_cuda, config=wl)  # fmt: skip
    return out, count, extra


def sweep_triton(x: torch.Tensor, global_amax: torch.Tensor, method: str = "pruned") -> torch.Tensor:
    """MSE-optimal NVFP4 block amax with the Triton kernels, bit-identical to the reference sweep.

    Args:
        x: fp32/fp16/bf16 tensor on CUDA (or on CPU under ``TRITON_INTERPRET=1``), any shape whose
            last dim is divisible by 16, finite (``nvfp4_scale_sweep`` checks that).
        global_amax: one-element tensor on ``x``'s device (the per-tensor amax).
        method: ``"pruned"`` (scores ~11 of 126 codes per block, re-sweeps the blocks its proof
            does not cover) or ``"exhaustive"`` (all 126).

    Returns:
        fp32 tensor ``[x.numel() // 16]`` on ``x``'s device: ``(v / 448) * global_amax`` for each
        block's winning FP8 code ``v``.

    Raises:
        ValueError, TypeError: bad ``method``, ``x`` or ``global_amax``, or a CPU tensor when the
            kernels were not built for the interpreter.
    """
    _check_inputs(x, global_amax, method)
    return launch_sweep(x, global_amax, method)[0]
