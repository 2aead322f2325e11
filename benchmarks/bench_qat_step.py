"""Cost of NVFP4 weight fake-quant in a QAT training step (forward + backward, bf16).

Measures one MLP block, Llama-2-7B shaped by default (SwiGLU: gate and up 4096 -> 11008, down
11008 -> 4096; ``--mlp gelu`` for a plain 4096 -> 11008 -> 4096 two-layer MLP), on
``--batch x --seq`` tokens (8 x 2048 by default):

* ``linear``: plain ``nn.Linear`` layers, the baseline;
* ``nvfp4 triton``: ``NVFP4Linear`` with the fused Triton fake-quant kernel (the CUDA default);
* ``nvfp4 reference``: ``NVFP4Linear`` with the PyTorch fake-quant (:func:`format.fake_quantize_unchecked`);
* ``w4a4 triton``: weights and inputs fake-quantized (``quantize_activations=True``).

It also times the W4A4 input fake-quant alone (the down projection's input, tokens x ffn), by
path and by stage, against a plain copy of the input, and the weight fake-quant alone (one 11008 x 4096 weight): the kernel with the layer's
cached FP8 bytes and decision table (what a training step runs between scale changes), and with
their preparation; with ``--configs``, each launch configuration of the kernel. Medians from ``triton.testing.do_bench`` on CUDA; on the CPU
(``--small``, for a smoke test) medians of ``time.perf_counter`` over a few runs.

    python benchmarks/bench_qat_step.py            # on the GPU
    python benchmarks/bench_qat_step.py --ffn 14336   # Llama-3-8B shaped MLP
    python benchmarks/bench_qat_step.py --small    # anywhere, seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import nvfp4_qat
from nvfp4_qat import QATConfig, quantize_model
from nvfp4_qat.modules import NVFP4Linear, fake_quantize, max_block_amax


class MLP(nn.Module):
    """SwiGLU (``down(silu(gate(x)) * up(x))``) or GELU (``down(gelu(up(x)))``) block."""

    def __init__(self, hidden: int, ffn: int, kind: str, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.kind = kind
        self.gate = nn.Linear(hidden, ffn, **kw) if kind == "swiglu" else None
        self.up = nn.Linear(hidden, ffn, **kw)
        self.down = nn.Linear(ffn, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def print_versions(device: str) -> None:
    gpu = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"none (CPU: {platform.processor() or 'unknown'})"
    )
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"GPU: {gpu}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton_version}, nvfp4_qat {nvfp4_qat.__version__}")  # fmt: skip


def median_ms(fn, device: str, grad_to_none=None, reps: int = 5) -> float:
    """Median milliseconds of ``fn``: ``do_bench`` on CUDA, a plain timer on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=100, rep=500, grad_to_none=grad_to_none, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def make_variant(name: str, args, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(args.hidden, args.ffn, args.mlp, torch.bfloat16, device)
    if name == "linear":
        return model
    # init "max": the benchmark measures the training step, not the initial sweep
    quantize_model(model, QATConfig(init_calibration="max", quantize_activations=name.startswith("w4a4")))
    for m in model.modules():
        if isinstance(m, NVFP4Linear):
            m.fake_quant_backend = name.split()[-1]
    return model


def bench_steps(args, device: str) -> None:
    tokens = args.batch * args.seq
    x = torch.randn(tokens, args.hidden, device=device, dtype=torch.bfloat16)
    grad_out = torch.randn(tokens, args.hidden, device=device, dtype=torch.bfloat16)
    variants = ["linear", "nvfp4 reference", "w4a4 reference"]
    if device == "cuda":
        variants[1:1] = ["nvfp4 triton"]
        variants.append("w4a4 triton")
    n_lin = 3 if args.mlp == "swiglu" else 2
    print(f"\nQAT step (forward + backward), {args.mlp} MLP {args.hidden} -> {args.ffn} -> {args.hidden}, "
          f"{n_lin} linear layers, bf16, {args.batch} x {args.seq} = {tokens} tokens")  # fmt: skip
    print(f"{'variant':<14} {'median ms':>10} {'overhead':>9}")
    base = None
    outputs = {}
    for name in variants:
        model = make_variant(name, args, device)
        params = list(model.parameters())

        def step(model=model):
            model(x).backward(grad_out)

        ms = median_ms(step, device, grad_to_none=params)
        with torch.no_grad():
            outputs[name] = model(x)
        base = ms if base is None else base
        print(f"{name:<14} {ms:>10.3f} {100 * (ms - base) / base:>8.1f}%")
        del model, params
    for kernel, ref in (("nvfp4 triton", "nvfp4 reference"), ("w4a4 triton", "w4a4 reference")):
        if kernel in outputs:
            print(f"check: {kernel} output equals {ref}: {torch.equal(outputs[kernel], outputs[ref])}")


def bench_fake_quant(args, device: str) -> None:
    torch.manual_seed(0)
    w = (torch.randn(args.ffn, args.hidden, device=device) * 0.02).to(torch.bfloat16)
    g, block = max_block_amax(w)
    gbytes = 2 * w.numel() * w.element_size() / 1e9  # one read, one write
    print(f"\nweight fake-quant alone, {args.ffn} x {args.hidden} bf16")
    print(f"{'implementation':<34} {'median ms':>10} {'GB/s':>8}")
    rows = [("reference (format.py)", lambda: fake_quantize(w, block, g, "reference"))]
    if device == "cuda":
        from nvfp4_qat.kernels.fake_quant import CONFIGS, DEFAULT_CONFIG, fake_quant_prepared, prepare

        # The layers cache the FP8 bytes and decision table between scale changes: the kernel then
        # runs alone ("cached"); "+ prepare" also builds them (a dozen small PyTorch ops), as
        # fake_quant_triton and an uncached first forward do.
        codes, table = prepare(block, g)
        rows.append(("triton + prepare (uncached)", lambda: fake_quantize(w, block, g, "triton")))
        for cfg in CONFIGS if args.configs else (DEFAULT_CONFIG,):
            tag = " (default)" if cfg == DEFAULT_CONFIG else ""
            rows.append((f"triton cached R{cfg['ROWS']} w{cfg['num_warps']} t{cfg.get('TILES', 1)}{tag}",
                         lambda cfg=cfg: fake_quant_prepared(w, codes, table, config=cfg)))  # fmt: skip
        same = torch.equal(fake_quantize(w, block, g, "triton"), fake_quantize(w, block, g, "reference"))
        print(f"check: triton equals torch bit for bit: {same}")
    for label, fn in rows:
        ms = median_ms(fn, device)
        print(f"{label:<34} {ms:>10.4f} {gbytes / (ms / 1e3):>8.1f}")


def bench_act_quant(args, device: str) -> None:
    """The W4A4 input fake-quant alone, on the down projection's input (tokens x ffn, bf16)."""
    torch.manual_seed(0)
    x = torch.randn(args.batch * args.seq, args.ffn, device=device).to(torch.bfloat16)
    layer = NVFP4Linear(args.ffn, 16, device=device, dtype=torch.bfloat16,
                        config=QATConfig(init_calibration="max", quantize_activations=True))  # fmt: skip
    print(f"\nW4A4 input fake-quant alone, {x.shape[0]} x {x.shape[1]} bf16 (training forward)")
    print(f"{'implementation':<34} {'median ms':>10} {'x copies':>8}")
    rows = [("x.clone() (1 read + 1 write)", x.clone)]
    for backend in ("reference", "triton") if device == "cuda" else ("reference",):

        def run(backend=backend):
            layer.fake_quant_backend = backend
            return layer.fake_quantized_input(x)

        rows.append((f"layer input, {backend}", run))
    if device == "cuda":
        from nvfp4_qat.kernels import act_quant

        def before() -> torch.Tensor:  # the path this package took before kernels.act_quant
            cur = x.abs().amax().to(torch.float32)
            block = x.abs().reshape(-1, 16).amax(dim=-1).to(torch.float32)
            return torch.ops.nvfp4_qat.fake_quant_nvfp4(x, block, cur)

        g = act_quant.input_amax(x)
        thresholds, table = act_quant.prepare_dynamic(g)
        rows += [
            ("before: abs, amax x2, fake_quant op", before),
            ("max pass (act_amax)", lambda: act_quant.input_amax(x)),
            ("prepare_dynamic (small ops)", lambda: act_quant.prepare_dynamic(g)),
            ("fused pass (act_quant_prepared)", lambda: act_quant.act_quant_prepared(x, thresholds, table)),
        ]
        same = torch.equal(before(), torch.ops.nvfp4_qat.act_fake_quant(x, g))
        print(f"check: new path equals the old one bit for bit: {same}")
    base = None
    for label, fn in rows:
        ms = median_ms(fn, device)
        base = ms if base is None else base
        print(f"{label:<34} {ms:>10.4f} {ms / base:>8.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes for a CPU smoke test")
    parser.add_argument("--mlp", choices=["swiglu", "gelu"], default="swiglu")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--configs", action="store_true", help="time each kernel launch configuration")
    args = parser.parse_args(argv)
    if args.small:
        args.hidden, args.ffn, args.batch, args.seq = 64, 176, 2, 32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print_versions(device)
    bench_steps(args, device)
    bench_fake_quant(args, device)
    bench_act_quant(args, device)


if __name__ == "__main__":
    main()
