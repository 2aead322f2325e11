"""Bad input gets a clear error naming the argument, never a NaN scale or a deep torch crash."""

import pytest
import torch

from nvfp4_qat import fake_quantize_nvfp4, nvfp4_scale_sweep

X = torch.randn(4, 32)
G = X.abs().max()
BMAX = X.abs().reshape(4, 2, 16).amax(-1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.randn(4, 30)}, ValueError, r"x.shape\[-1\] must be divisible by block_size=16"),
        ({"block_size": 0}, ValueError, r"block_size must be a positive int, got 0"),
        ({"block_size": -16}, ValueError, r"block_size must be a positive int"),
        ({"block_size": 16.0}, TypeError, r"block_size must be a positive int, got float"),
        ({"x": torch.ones(4, 32, dtype=torch.int32)}, TypeError, r"x must have a floating dtype"),
        ({"x": torch.ones(4, 32, dtype=torch.float64)}, TypeError, r"x must have a floating dtype"),
        ({"x": [1.0] * 16}, TypeError, r"x must be a torch.Tensor, got list"),
        ({"x": torch.empty(0, 32)}, ValueError, r"x must be a non-empty tensor"),
        ({"x": torch.tensor(1.0)}, ValueError, r"x must be a non-empty tensor with at least 1 dim"),
        (
            {"x": X.clone().index_fill_(1, torch.tensor([3]), float("nan"))},
            ValueError,
            r"x must be finite, but 4 of 128",
        ),
        ({"x": X.clone().index_fill_(0, torch.tensor([1]), float("inf"))}, ValueError, r"x must be finite"),
        ({"global_amax": -1.0}, ValueError, r"global_amax must be finite and >= 0, got -1.0"),
        (
            {"global_amax": torch.tensor(float("nan"))},
            ValueError,
            r"global_amax must be finite and >= 0, got nan",
        ),
        ({"global_amax": float("inf")}, ValueError, r"global_amax must be finite and >= 0, got inf"),
        (
            {"global_amax": torch.ones(2)},
            ValueError,
            r"global_amax must be a scalar \(one element\), got shape \(2,\)",
        ),
        ({"global_amax": "1.0"}, TypeError, r"global_amax must be a scalar tensor or a number, got str"),
        ({"global_amax": torch.tensor(3)}, TypeError, r"global_amax must be a floating tensor"),
        (
            {"global_amax": torch.tensor(1.0, device="meta")},
            ValueError,
            r"x and global_amax must be on the same device",
        ),
        (
            {"backend": "cuda"},
            ValueError,
            r"backend must be one of \('auto', 'triton', 'reference'\), got 'cuda'",
        ),
        ({"method": "fast"}, ValueError, r"method must be one of \('pruned', 'exhaustive'\), got 'fast'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_sweep_rejects_bad_input(kwargs, error, match):
    args = {"x": X, "global_amax": G, "block_size": 16, "backend": "reference", "method": "pruned"}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        nvfp4_scale_sweep(**args)


def test_sweep_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import triton  # noqa: F401 - a dependency on Linux: fail, never skip, if it is missing

    with pytest.raises(ValueError, match=r"backend='triton' needs a CUDA tensor .*TRITON_INTERPRET=1.*cpu"):
        nvfp4_scale_sweep(X, G, backend="triton")


def test_sweep_auto_on_cpu_takes_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(nvfp4_scale_sweep(X, G, backend="auto"), nvfp4_scale_sweep(X, G, backend="reference"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"block_amax": BMAX[:, :1]}, ValueError, r"block_amax must have shape \(4, 2\) or \(8,\)"),
        ({"block_amax": BMAX.int()}, TypeError, r"block_amax must be a floating tensor"),
        ({"block_amax": BMAX.clone().fill_(float("nan"))}, ValueError, r"block_amax must be finite and >= 0"),
        ({"block_amax": -BMAX}, ValueError, r"block_amax must be finite and >= 0"),
        ({"block_amax": BMAX.to("meta")}, ValueError, r"x and block_amax must be on the same device"),
        ({"global_amax": -2.0}, ValueError, r"global_amax must be finite and >= 0"),
        ({"x": torch.randn(4, 24)}, ValueError, r"divisible by block_size=16"),
        ({"block_size": 0}, ValueError, r"block_size must be a positive int"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_fake_quantize_rejects_bad_input(kwargs, error, match):
    args = {"x": X, "block_amax": BMAX, "global_amax": G, "block_size": 16}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fake_quantize_nvfp4(**args)


def test_import_works_without_triton(monkeypatch):
    """The package imports and falls back to the reference where triton is missing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, nvfp4_qat\n"
        "from nvfp4_qat._backend import triton_available, resolve_backend\n"
        "assert not triton_available()\n"
        "assert resolve_backend('auto', torch.device('cpu')) == 'reference'\n"
        "x = torch.randn(2, 16); print(nvfp4_qat.nvfp4_scale_sweep(x, x.abs().max()).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([2])"
