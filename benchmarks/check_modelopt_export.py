"""Byte-for-byte check of our NVFP4 export packing against ModelOpt's own NVFP4 code.

For each case (weights, ``block_amax``, ``global_amax``) it packs with :func:`nvfp4_qat.export.pack_nvfp4`
and checks our round trip (``unpack_nvfp4`` equals ``fake_quantize_nvfp4`` bit for bit). Where
``modelopt`` imports, it then compares with ModelOpt's ``NVFP4QTensor`` (the code its HF export uses):

* ``scale``: the FP8 ``weight_scale`` bytes ModelOpt's static path derives from the same amax values
  (classified: amax 0, where ModelOpt writes a dummy scale; blocks format.py flushes to code 0, where
  ModelOpt clamps to the smallest subnormal 2^-9 and so dequantizes differently; other);
* ``scale_2``: ModelOpt's ``weight_scale_2`` bits (ulps apart);
* ``pack``: ModelOpt's packed bytes for the same weights and our scales, with every differing element
  classified: in a zero-scale block (ModelOpt divides by 0 there; either code dequantizes to 0), near
  an E2M1 midpoint (ModelOpt rounds ``|x| / (e*s2)``, format.py rounds ``|x| / s2`` against
  ``midpoint*e``; see format.py's docstring), or unexplained;
* ``deq``: ModelOpt's dequantization of *our* files against ours (what a runtime would compute).

The exit status is 1 when our round trip fails, ``scale_2`` is more than 1 ulp off, or a byte
differs unexplained. Without modelopt (or
CUDA) it runs our side only and says so.

Usage::

    python benchmarks/check_modelopt_export.py                      # CUDA if present, else CPU
    python benchmarks/check_modelopt_export.py --rows 4096 --cols 11008 --seeds 3
"""

from __future__ import annotations

import argparse
import platform
import sys
from types import SimpleNamespace

import torch

import nvfp4_qat
from nvfp4_qat.export import pack_nvfp4, unpack_nvfp4
from nvfp4_qat.format import E2M1_MIDPOINTS, block_codes, fake_quantize_nvfp4, global_scale
from nvfp4_qat.sweep import nvfp4_scale_sweep


def load_modelopt():
    """ModelOpt's NVFP4QTensor and version, or (None, reason)."""
    try:
        import modelopt
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    except Exception as err:  # ImportError, or a missing optional dependency deeper down
        return None, f"unavailable ({type(err).__name__}: {err})"
    return NVFP4QTensor, modelopt.__version__


def print_versions(device: torch.device, modelopt_version: str) -> None:
    gpu = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"none (CPU: {platform.processor()})"
    )
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"GPU: {gpu}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}")
    print(f"nvfp4_qat {nvfp4_qat.__version__}, modelopt {modelopt_version}")


def make_cases(rows: int, cols: int, seed: int, device: torch.device):
    """(label, bf16 weight, block_amax [rows, cols/16] fp32, global_amax) for one seed."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.randn(rows, cols, generator=gen) * 0.02
    nb = cols // 16

    def amax(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = w.float().abs().reshape(rows, nb, 16).amax(-1)
        return b, b.max()

    w = base.to(torch.bfloat16).to(device)
    b, g = amax(w)
    yield "max", w, b, g
    best = nvfp4_scale_sweep(w, g).reshape(rows, nb)
    yield "mse", w, best, g
    # Block magnitudes over 2^-20..1 reach FP8-subnormal codes and underflow; some blocks all zero.
    spread = torch.exp2(torch.empty(rows, nb, 1).uniform_(-20, 0, generator=gen))
    zero = torch.rand(rows, nb, 1, generator=gen) < 0.02
    w = (base.reshape(rows, nb, 16) * spread).masked_fill(zero, 0.0).reshape(rows, cols)
    w = w.to(torch.bfloat16).to(device)
    b, g = amax(w)
    yield "wide+zero", w, b, g
    # Scales off the max (as after training moved the weights): saturation and loose blocks.
    factor = torch.empty(rows, nb).uniform_(0.5, 1.5, generator=gen).to(device)
    yield "max*U(0.5,1.5)", w, b * factor, g


def near_midpoint(x: torch.Tensor, e: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Elements whose ModelOpt quotient or our ``u`` lies within 8 fp32 ulps of an E2M1 midpoint."""
    t = x.float().abs().reshape(e.shape[0], -1) / (e * s2)  # ModelOpt's rounding order
    u = x.float().abs().reshape(e.shape[0], -1) / s2
    out = torch.zeros_like(t, dtype=torch.bool)
    for mid, _ in E2M1_MIDPOINTS:
        out |= (t - mid).abs() <= 8 * torch.finfo(torch.float32).eps * mid
        out |= (u - mid * e).abs() <= 8 * torch.finfo(torch.float32).eps * mid * e
    return out.reshape(x.shape)


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def check_case(label, w, b, g, NVFP4QTensor) -> bool:
    packed, ws, ws2 = pack_nvfp4(w, b, g)
    ours = unpack_nvfp4(packed, ws, ws2, w.dtype)
    fq = fake_quantize_nvfp4(w, b, g)
    ok = torch.equal(ours, fq)
    line = f"{label:>15} | {w.numel():>10} el | ours==fake_quant: {'yes' if ok else 'NO'}"
    if NVFP4QTensor is None:
        print(line)
        return ok
    # ModelOpt's static export path from the same amax values (a stand-in quantizer object).
    quantizer = SimpleNamespace(global_amax=g.clone(), _amax=b.clone(), block_sizes={-1: 16})
    mo_ws, mo_ws2 = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(quantizer, w)
    scale_differs = mo_ws.view(torch.uint8) != ws.view(torch.uint8)
    ours_zero = ws.float() == 0  # format.py: code 0 when (amax/6)/s2 rounds below 2^-9 (or amax == 0)
    s_zero = int((scale_differs & (b == 0)).sum())
    s_flush = int((scale_differs & ours_zero & (b > 0)).sum())
    # ModelOpt's rounding order: ((amax / 6) * 448) / (g / 6), with both "/ 6" by a Python float (on
    # CUDA a multiplication by the reciprocal), vs ours (amax / 6) / s2 with correctly rounded divisions.
    # Where the two ratios straddle an FP8 rounding boundary, the bytes differ by one code.
    b6 = b.float() / 6.0
    mo_ratio = (b6 * 448.0 / (g.float() / 6.0)).clamp(2**-9, 448.0)
    # ours exactly as format.block_codes computes it (tensor divisions: correctly rounded on CUDA too)
    our_ratio = (b.float() / torch.tensor(6.0, device=b.device)) / global_scale(g)
    mo_order = (mo_ratio.to(torch.float8_e4m3fn).view(torch.uint8) == mo_ws.view(torch.uint8)) & (
        our_ratio.clamp(0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8) == ws.view(torch.uint8)
    )
    ulps = (mo_ratio.view(torch.int32) - our_ratio.view(torch.int32)).abs()
    s_order_mask = scale_differs & ~ours_zero & (b > 0) & mo_order
    s_order = int(s_order_mask.sum())
    s_order_ulps = int(ulps[s_order_mask].max()) if s_order else 0
    s_other = int(scale_differs.sum()) - s_zero - s_flush - s_order
    other_mask = scale_differs & ~(b == 0) & ~(ours_zero & (b > 0)) & ~s_order_mask
    for idx in other_mask.reshape(-1).nonzero().flatten()[:5].tolist():  # describe what is unexplained
        bf, wsf, mof = b.reshape(-1), ws.reshape(-1), mo_ws.reshape(-1)
        print(f"    unexplained scale byte at block {idx}: amax {float(bf[idx])!r} (0x{int(bf[idx].view(torch.int32)):08x}), "
              f"g {float(g)!r}, ours (amax/6)/s2 = {float(our_ratio.reshape(-1)[idx])!r} -> 0x{int(wsf[idx].view(torch.uint8)):02x}, "
              f"ModelOpt-order ratio {float(mo_ratio.reshape(-1)[idx])!r} -> 0x{int(mo_ratio.reshape(-1)[idx].to(torch.float8_e4m3fn).view(torch.uint8)):02x}, "
              f"ModelOpt byte 0x{int(mof[idx].view(torch.uint8)):02x}; weight_scale_2 ours {float(ws2)!r} ModelOpt {float(mo_ws2)!r}")  # fmt: skip
    # ModelOpt divides by a Python scalar: on CUDA that multiplies by the reciprocal (1 ulp off at most).
    scale2_ulps = abs(int(mo_ws2.reshape(()).view(torch.int32)) - int(ws2.reshape(()).view(torch.int32)))
    # ModelOpt's packer on the same weights and *our* scales.
    qt, _, _ = NVFP4QTensor.quantize(w.clone(), 16, weights_scaling_factor=ws, weights_scaling_factor_2=ws2)
    mo_packed = qt._quantized_data
    byte_diff = int((mo_packed != packed).sum())
    differs = nibbles(mo_packed) != nibbles(packed)  # (rows, cols) per element
    e = block_codes(b.reshape(w.shape[0], -1, 1), global_scale(g))  # (rows, nb, 1)
    zero_block = (e == 0).expand(-1, -1, 16).reshape(w.shape)
    mid = near_midpoint(w, e.reshape(-1, 1), global_scale(g)) & ~zero_block
    n_zero = int((differs & zero_block).sum())
    n_mid = int((differs & mid).sum())
    n_other = int(differs.sum()) - n_zero - n_mid
    # ModelOpt's dequantization of our bytes (what a runtime reading our files computes).
    mo_deq = NVFP4QTensor(w.shape, w.dtype, packed).dequantize(
        dtype=w.dtype, scale=ws, double_scale=ws2, block_sizes={-1: 16}
    )
    deq_diff = int((mo_deq != ours).sum())
    fast = ""
    if w.is_cuda:  # ModelOpt's Triton dequant kernel, what its fast path (and a runtime) would use
        try:
            mo_fast = NVFP4QTensor(w.shape, w.dtype, packed).dequantize(
                dtype=w.dtype, scale=ws, double_scale=ws2, block_sizes={-1: 16}, fast=True
            )
            fast = f"; fast (Triton) dequant differs {int((mo_fast != ours).sum())}"
        except Exception as err:
            fast = f"; fast dequant not run ({type(err).__name__}: {err})"
    print(
        f"{line}\n"
        f"{'':>17}weight_scale bytes differ {int(scale_differs.sum())}/{ws.numel()}: amax 0 {s_zero}, "
        f"ours flushed to 0 where ModelOpt clamps to 2^-9 {s_flush}, rounding order "
        f"(ratios <= {s_order_ulps} ulp apart across an FP8 rounding boundary) {s_order}, other {s_other}; "
        f"weight_scale_2 differs by {scale2_ulps} ulp\n"
        f"{'':>17}packed bytes differ {byte_diff}/{packed.numel()}; elements: in zero-scale blocks "
        f"{n_zero}, at a midpoint {n_mid}, unexplained {n_other}\n"
        f"{'':>17}ModelOpt dequant of our bytes differs in {deq_diff} elements{fast}"
    )
    return ok and n_other == 0 and deq_diff == 0 and s_other == 0 and scale2_ulps <= 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="default 4096 on CUDA, 256 on CPU")
    parser.add_argument("--cols", type=int, default=None, help="default 11008 on CUDA, 512 on CPU")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rows = args.rows or (4096 if cuda else 256)
    cols = args.cols or (11008 if cuda else 512)
    NVFP4QTensor, mo_version = load_modelopt()
    print_versions(device, mo_version)
    if NVFP4QTensor is None:
        print("ModelOpt was unavailable: checking our side only (pack/unpack vs fake_quantize_nvfp4)")
    print(f"shape [{rows}, {cols}] bf16 on {device}, seeds 0..{args.seeds - 1}")
    ok = True
    for seed in range(args.seeds):
        for label, w, b, g in make_cases(rows, cols, seed, device):
            ok &= check_case(f"s{seed} {label}", w, b, g, NVFP4QTensor)
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
