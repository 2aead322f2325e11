"""QAT building blocks: straight-through estimators and ``NVFP4Linear``.

``NVFP4Linear`` is an ``nn.Linear`` whose forward uses the NVFP4 fake-quantized weight
``fake_quantize_nvfp4(weight, block_amax, global_amax)`` with static scales held in fp32 buffers.
The scales move only when :func:`~nvfp4_qat.recalibrate` (or the Lightning callback) says so;
between recalibrations the layer is a plain linear layer with a rounding step in front.

On CUDA the fake-quant runs as one fused Triton kernel (:mod:`nvfp4_qat.kernels.fake_quant`),
elsewhere as :func:`nvfp4_qat.format.fake_quantize_unchecked`; both give the same bits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nvfp4_qat._backend import resolve_backend
from nvfp4_qat._validation import check_choice
from nvfp4_qat.config import QATConfig
from nvfp4_qat.format import FP4_MAX, block_codes, fake_quantize_unchecked, global_scale

__all__ = [
    "NVFP4ActivationSTE",
    "NVFP4Linear",
    "NVFP4WeightClippedSTE",
    "NVFP4WeightSTE",
    "fake_quantize",
    "quant_error_stats",
]

_SCALE_BUFFERS = ("block_amax", "global_amax", "input_amax")
_fused_module = None


def _fused():
    """:mod:`nvfp4_qat.kernels.fake_quant`, imported on first use (importing it compiles nothing but
    loads Triton, and registers ``torch.ops.nvfp4_qat.fake_quant_nvfp4``)."""
    global _fused_module
    if _fused_module is None:
        from nvfp4_qat.kernels import fake_quant

        _fused_module = fake_quant
    return _fused_module


def _use_kernel(x: torch.Tensor, backend: str) -> bool:
    return resolve_backend(backend, x.device, name="fake_quant_backend") == "triton"


def fake_quantize(
    x: torch.Tensor,
    block_amax: torch.Tensor,
    global_amax: torch.Tensor,
    backend: str = "auto",
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """NVFP4 fake-quant with block 16, unvalidated (the modules' hot path); no autograd rule.

    Args:
        x: tensor whose last dim is a multiple of 16.
        block_amax: fp32, ``x.numel() // 16`` values on ``x``'s device.
        global_amax: 0-dim fp32 tensor on ``x``'s device.
        backend: ``"auto"`` (Triton kernel where it runs), ``"triton"`` or ``"reference"``.
        state: the kernel's ``(codes, table)`` for these scales
            (:func:`nvfp4_qat.kernels.fake_quant.prepare`), if the caller caches it.

    Returns:
        The fake-quantized tensor, same shape and dtype as ``x``, bit-identical for every backend.
    """
    if _use_kernel(x, backend):
        if state is None or torch.compiler.is_compiling():
            _fused()  # registers the operator
            return torch.ops.nvfp4_qat.fake_quant_nvfp4(x, block_amax, global_amax)
        return _fused().fake_quant_prepared(x, *state)
    return fake_quantize_unchecked(x, block_amax, global_amax, 16)


def quant_error_stats(
    x: torch.Tensor,
    block_amax: torch.Tensor,
    global_amax: torch.Tensor,
    backend: str = "auto",
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[sum of squared NVFP4 error, max |x|, sum x^2]``, fp32, on ``x``'s device, no host sync.

    The error is that of the NVFP4 value in fp32 (``fake_quantize_nvfp4(x.float(), ...)``), which
    is what the scale sweep minimises and what an fp32 dequantization of the export gives; the
    forward of a bf16/fp16 layer rounds that value once more to the weight's dtype. On CUDA one
    fused kernel pass (one read, no temporaries); elsewhere PyTorch. The two agree to fp32
    rounding of the sums (the max is exact). NaN/Inf weights make the first value NaN/Inf.
    """
    if _use_kernel(x, backend):
        fused = _fused()
        state = fused.prepare(block_amax, global_amax) if state is None else state
        return fused.stats_prepared(x, *state)
    xf = x.detach().to(torch.float32)
    err = fake_quantize_unchecked(xf, block_amax, global_amax, 16) - xf
    absx = xf.abs()
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    amax = absx.amax() if absx.numel() else zero
    return torch.stack([err.square().sum(), amax, absx.square().sum()])


class NVFP4WeightSTE(torch.autograd.Function):
    """Weight fake-quant with the straight-through estimator.

    Forward: ``fake_quantize_nvfp4(w, block_amax, global_amax)``.
    Backward: ``dL/dw = dL/dw_q`` (the gradient passes unchanged); the scales get no gradient.
    """

    @staticmethod
    def forward(ctx: Any, weight, block_amax, global_amax, backend: str = "auto", state=None):
        return fake_quantize(weight, block_amax, global_amax, backend, state)

    @staticmethod
    def backward(ctx: Any, grad_output):
        return grad_output, None, None, None, None


class NVFP4WeightClippedSTE(torch.autograd.Function):
    """Weight fake-quant with the clipped straight-through estimator.

    Forward: ``fake_quantize_nvfp4(w, block_amax, global_amax)``.
    Backward: ``dL/dw = dL/dw_q`` where ``|w| <= 6 * block_scale`` and 0 elsewhere, with
    ``block_scale = e * s2`` (``e`` = :func:`~nvfp4_qat.format.block_codes`, ``s2`` =
    ``global_amax / 2688``) and both sides compared in fp32. Those are the elements that saturation
    clips to ``±6 * block_scale``; a block whose scale is 0 passes gradient only where ``w == 0``.
    The scales get no gradient.
    """

    @staticmethod
    def forward(ctx: Any, weight, block_amax, global_amax, backend: str = "auto", state=None):
        ctx.save_for_backward(weight, block_amax, global_amax)  # no copies: a parameter, buffers
        return fake_quantize(weight, block_amax, global_amax, backend, state)

    @staticmethod
    def backward(ctx: Any, grad_output):
        weight, block_amax, global_amax = ctx.saved_tensors
        s2 = global_scale(global_amax)
        block_scale = block_codes(block_amax.reshape(-1, 1), s2) * s2  # (n_blocks, 1)
        inside = weight.detach().to(torch.float32).abs().reshape(-1, 16) <= FP4_MAX * block_scale
        grad = grad_output * inside.reshape(weight.shape).to(grad_output.dtype)
        return grad, None, None, None, None


def _act_ops() -> None:
    """Register ``torch.ops.nvfp4_qat.act_amax`` and ``act_fake_quant`` (the W4A4 input kernels,
    :mod:`nvfp4_qat.kernels.act_quant`) on first use; later calls find the module imported."""
    from nvfp4_qat.kernels import act_quant  # noqa: F401


def _block_amax(x: torch.Tensor) -> torch.Tensor:
    # The input's own per-block amax, (n_blocks,) fp32 (NaN for a block holding NaN).
    return x.detach().abs().reshape(-1, 16).amax(dim=-1).to(torch.float32)


class NVFP4ActivationSTE(NVFP4WeightSTE):
    """Activation fake-quant with the straight-through estimator (the W4A4 input path).

    Forward: ``fake_quantize_nvfp4(x, block_amax, global_amax)`` with the input's own per-block
    amax. Backward: ``dL/dx = dL/dx_q`` (unchanged); the amaxes get no gradient.

    ``block_amax=None`` means "the input's own": on the kernel path the fused kernel takes each
    block's amax from the tile it loads (:mod:`nvfp4_qat.kernels.act_quant`), so no per-block tensor
    is made; the PyTorch path computes it. Both give the bits of the explicit form.
    """

    @staticmethod
    def forward(ctx: Any, x, block_amax, global_amax, backend: str = "auto", state=None):
        if block_amax is not None:
            return fake_quantize(x, block_amax, global_amax, backend, state)
        if _use_kernel(x, backend):
            _act_ops()
            return torch.ops.nvfp4_qat.act_fake_quant(x, global_amax)
        return fake_quantize_unchecked(x, _block_amax(x), global_amax, 16)


_WEIGHT_STE = {"ste": NVFP4WeightSTE, "clipped_ste": NVFP4WeightClippedSTE}


def max_block_amax(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max calibration: ``(global_amax [] fp32, block_amax [out, in // 16] fp32)`` of a weight."""
    absw = weight.detach().abs()
    block = absw.reshape(*weight.shape[:-1], weight.shape[-1] // 16, 16).amax(dim=-1)
    return absw.amax().to(torch.float32), block.to(torch.float32)


class NVFP4Linear(nn.Linear):
    """``nn.Linear`` with an NVFP4 fake-quantized weight (and optionally input) in forward.

    Buffers (fp32, persistent, moved by ``.to(device)``; ``.to(dtype)``/``.half()`` leave them fp32
    so that a scale never loses bits):

    * ``block_amax`` ``[out_features, in_features // 16]``: static per-block amax; the FP8 block
      code is ``block_codes(block_amax, global_amax / 2688)``.
    * ``global_amax`` ``[]``: per-tensor amax of the weight.
    * ``input_amax`` ``[]``: per-tensor amax of the inputs, used only with
      ``config.quantize_activations``; a running max of ``|input|`` updated (without gradient) in
      every training forward and used as is in eval. While it is still 0 (never trained) the eval
      forward uses the current input's max instead, so an uncalibrated layer does not output 0.
      A batch with NaN/Inf is skipped (not folded in) and counted in the non-persistent int64
      buffer ``nonfinite_input_batches``; :meth:`reset_input_amax` starts the max afresh.
      Inputs use dynamic per-block amax (their own 16-blocks along the last dim).

    The bias stays full precision. ``config.fake_quant_backend`` selects the fake-quant
    implementation (``"auto"``: the Triton kernel on CUDA; ``"triton"``; ``"reference"``: PyTorch);
    :attr:`fake_quant_backend` reads and sets it.
    """

    block_amax: torch.Tensor
    global_amax: torch.Tensor
    input_amax: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        config: QATConfig | None = None,
    ) -> None:
        config = QATConfig() if config is None else config
        if not isinstance(config, QATConfig):
            raise TypeError(f"config must be a QATConfig or None, got {type(config).__name__}")
        if in_features % config.block_size != 0:
            raise ValueError(
                f"in_features must be divisible by block_size={config.block_size}, got {in_features}"
            )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config
        self._kernel_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernel_state_key: tuple | None = None
        kw = {"dtype": torch.float32, "device": self.weight.device}
        self.register_buffer("block_amax", torch.zeros(out_features, in_features // config.block_size, **kw))
        self.register_buffer("global_amax", torch.zeros((), **kw))
        self.register_buffer("input_amax", torch.zeros((), **kw))
        # Not saved (checkpoints keep their keys): W4A4 training batches left out of input_amax.
        self.register_buffer(
            "nonfinite_input_batches",
            torch.zeros((), dtype=torch.int64, device=kw["device"]),
            persistent=False,
        )
        self.init_scales()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig | None = None) -> NVFP4Linear:
        """Wrap ``linear``: the same weight and bias ``Parameter`` objects, new scale buffers.

        No copy and no dtype round trip: optimizers created later (or holding the parameters
        already) see the same tensors. The scales are calibrated from the weight with
        ``config.init_calibration`` -- except on the ``meta`` device, where there is no data: there
        the buffers are created on ``meta`` and :func:`~nvfp4_qat.recalibrate` must run once the
        weights are materialised (``to_empty`` + init or checkpoint load).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear`` or ``config`` not a ``QATConfig``.
            ValueError: ``in_features`` not divisible by 16, or a non-finite weight with ``"mse"``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        # Build on meta (allocates nothing, skips reset_parameters' work), then adopt the params.
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta", w.dtype, config)
        new.weight = linear.weight
        new.bias = linear.bias
        for name in (*_SCALE_BUFFERS, "nonfinite_input_batches"):
            setattr(new, name, torch.zeros_like(getattr(new, name), device=w.device))
        new.train(linear.training)
        new.init_scales()
        return new

    def init_scales(self, mode: str | None = None) -> None:
        """(Re)set ``global_amax`` and ``block_amax`` from the current weight, in place.

        Args:
            mode: ``"max"`` or ``"mse"``; default ``config.init_calibration``. Nothing happens on
                the ``meta`` device.

        Raises:
            ValueError: the weight holds NaN or Inf (no scale is written).
        """
        mode = self.config.init_calibration if mode is None else mode
        check_choice(mode, ("max", "mse"), "mode")
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            g, block = max_block_amax(self.weight)
            if not bool(torch.isfinite(g)):  # NaN/Inf weight: every scale would be NaN or Inf
                bad = int((~torch.isfinite(self.weight)).sum())
                raise ValueError(
                    f"weight must be finite for NVFP4 scales, but {bad} of {self.weight.numel()} "
                    "values are NaN or Inf (fix the weight or its initialisation before quantizing)"
                )
            if mode == "mse":
                from nvfp4_qat.sweep import nvfp4_scale_sweep

                block = nvfp4_scale_sweep(
                    self.weight.detach(), g, backend=self.config.backend, method=self.config.method
                )
            self.global_amax.copy_(g)
            self.block_amax.copy_(block.reshape(self.block_amax.shape))

    @property
    def fake_quant_backend(self) -> str:
        """``config.fake_quant_backend``; setting it replaces the config (validated, saved with it)."""
        return self.config.fake_quant_backend

    @fake_quant_backend.setter
    def fake_quant_backend(self, value: str) -> None:
        self.config = self.config.replace(fake_quant_backend=value)

    def fake_quantized_weight(self) -> torch.Tensor:
        """The weight as forward uses it: fake-quantized, same dtype, with the configured STE."""
        ste = _WEIGHT_STE[self.config.gradient]
        state = None if torch.compiler.is_compiling() else self.kernel_state(self.weight)
        return ste.apply(self.weight, self.block_amax, self.global_amax, self.fake_quant_backend, state)

    def quant_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weight, block_amax, global_amax)``, the objects attribute access returns, read straight
        from the module's parameter and buffer dicts: ``nn.Module.__getattr__`` costs about 1.2 us a
        name (2-core VM, 0.07 us from the dict), and recalibration reads them for every layer at its
        start and its end, while the GPU waits. A parametrized tensor (``torch.nn.utils.parametrize``)
        is not in those dicts: then attribute access computes it."""
        try:
            return self._parameters["weight"], self._buffers["block_amax"], self._buffers["global_amax"]
        except KeyError:
            return self.weight, self.block_amax, self.global_amax

    def kernel_state(self, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused kernel's ``(FP8 bytes, decision table)`` for the current scales, cached.

        Recomputed only when a scale buffer changes: the cache holds the two buffer objects
        themselves (so their storage cannot be reused by another tensor meanwhile) and their version
        counters, which every in-place write bumps (``copy_``, ``load_state_dict``, recalibration,
        DDP's buffer broadcast); a replaced or moved buffer is another object. ``None`` where the
        kernel is not used for ``like`` (default: the weight); inference-mode buffers (no version
        counter) are not cached.
        """
        like = self.weight if like is None else like
        return self.prepared_kernel_state() if _use_kernel(like, self.fake_quant_backend) else None

    def prepared_kernel_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`kernel_state` for a caller that knows the kernel applies (the fused recalibration,
        whose plan resolved every layer's backend once): the cache without the backend check, which
        cost more host time than the cache lookup (recalibration makes one per layer while the GPU
        waits for its first launches)."""
        _, b, g = self.quant_tensors()
        try:
            versions = (b._version, g._version)
        except RuntimeError:  # inference tensors have no version counter
            return _fused().prepare(b, g)
        key = self._kernel_state_key
        if key is None or key[0] is not b or key[1] is not g or key[2] != versions:
            self._cache_kernel_state(_fused().prepare(b, g), (b, g, versions))
        return self._kernel_state

    def set_kernel_state(self, codes: torch.Tensor, table: torch.Tensor) -> None:
        """Install :meth:`kernel_state` for the scales the buffers hold now (a recalibration that
        already has the FP8 bytes hands them over, so that the next forward need not recompute them).
        The caller guarantees that ``(codes, table)`` equal ``prepare(block_amax, global_amax)``."""
        _, b, g = self.quant_tensors()
        self._cache_kernel_state((codes, table), (b, g, (b._version, g._version)))

    def _cache_kernel_state(self, state: tuple[torch.Tensor, torch.Tensor], key: tuple) -> None:
        # Plain attributes (tuples, never parameters, buffers or modules), written straight into the
        # instance dict: nn.Module.__setattr__ took 8 us a layer for the two (2-core VM), 1.8 ms of
        # host time at the end of a 224-layer recalibration, against under 1 us.
        self.__dict__.update(_kernel_state=state, _kernel_state_key=key)

    def fake_quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as forward uses it with ``quantize_activations`` (updates ``input_amax`` in training).

        A batch holding NaN or Inf is not folded into ``input_amax`` (one bad batch would otherwise
        poison every later output); it is counted in ``nonfinite_input_batches`` instead, and its
        own output is NaN where the input was. No host sync: the skip is a ``torch.where``.
        """
        if _use_kernel(x, self.fake_quant_backend):
            # Two reads of x in all: the max here, then the fused kernel, which takes each block's
            # amax from its own tile (before: two abs() copies, two reductions, read and write).
            x = x.contiguous()  # once, not in each of the two operators
            _act_ops()
            cur = torch.ops.nvfp4_qat.act_amax(x.detach())
            block = None
        else:
            block = _block_amax(x)  # the max of the block maxima is max |x| (NaN wins in both)
            cur = block.amax() if block.numel() else block.new_zeros(())
        if self.training:
            with torch.no_grad():
                finite = torch.isfinite(cur)
                self.nonfinite_input_batches.add_(~finite)
                torch.maximum(self.input_amax, torch.where(finite, cur, 0.0), out=self.input_amax)
            g = self.input_amax
        else:
            g = torch.where(self.input_amax > 0, self.input_amax, cur)  # no host sync
        return NVFP4ActivationSTE.apply(x, block, g, self.fake_quant_backend)

    def reset_input_amax(self) -> None:
        """Forget the running input max (and the count of skipped batches), in place.

        The running max only grows: after an outlier batch (say one activation of 1e30, which makes
        every later input quantize to 0) or a change of data, reset it; the next training forward
        starts a new max, and an eval forward uses each input's own max until then.
        """
        with torch.no_grad():
            self.input_amax.zero_()
            self.nonfinite_input_batches.zero_()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.config.quantize_activations:
            input = self.fake_quantized_input(input)
        return F.linear(input, self.fake_quantized_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the fake-quantized weight baked in (a new ``Parameter``).

        The bias ``Parameter`` is shared, not copied. Input fake-quant is not carried over.
        """
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            w = self.weight if self.weight.device.type == "meta" else self.fake_quantized_weight()
        linear.weight = nn.Parameter(w.detach(), requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        # A NaN, Inf or negative scale would make every forward NaN (or silently 0): refuse it here,
        # before anything is copied, so load_state_dict raises instead of loading a broken layer.
        for name in _SCALE_BUFFERS:
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and not t.is_meta and t.is_floating_point():
                bad = ~(torch.isfinite(t) & (t >= 0))
                if bool(bad.any()):
                    error_msgs.append(
                        f"{prefix + name}: {int(bad.sum())} of {t.numel()} values are NaN, Inf or "
                        "negative; NVFP4 scales must be finite and >= 0 (the checkpoint is damaged)"
                    )
                    return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):
        # Module.to(dtype), .half(), bf16-true precision plugins would cast the scale buffers too;
        # keep them fp32 (taking only the device from fn) so that no scale is rounded.
        before = {name: self._buffers[name] for name in _SCALE_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and old is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{super().extra_repr()}, block_size={c.block_size}, gradient={c.gradient}, "
            f"quantize_activations={c.quantize_activations}"
        )
