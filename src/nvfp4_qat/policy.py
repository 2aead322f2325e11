"""Recalibration policies: which FP8 block scale a recalibration picks, and which changes it keeps.

A policy is a *criterion* (how a block's candidate scales are scored) plus *acceptance rules*
(whether a block, or the whole recalibration, takes the new scales):

* criterion ``"mse"``: the squared error between the latent weight and its NVFP4 value, the plain
  sweep. ``"activation"``: the same error weighted per input feature by the layer input's second
  moment ``E[x_j^2]`` (what the layer's *output* error is, to first order, for uncorrelated
  inputs), gathered by forward hooks (:class:`InputMoments`). ``"gradient"``: the change of the
  training loss that moving a block to a candidate scale predicts, from the optimizer's running
  gradient ``m`` and its noise ``v`` (Adam's first and second moments): the candidate with the
  largest signal-to-noise ratio ``z = -sum(m * dq) / sqrt(sum(v * dq^2))`` wins when
  ``z > min_gain`` (``dq``: the change of the block's quantized values), otherwise the block keeps
  its scale. The ratio has no free scale: it asks whether the minibatch gradients agree, over
  the last steps, that the move lowers the loss.
* ``keep_global_amax``: the per-tensor amax only grows (when ``max |w|`` exceeds it); otherwise it
  follows ``max |w|`` at every recalibration, which rescales *every* block's grid by the ratio.
* ``min_gain`` (``mse``/``activation``): a block switches only when its score improves by more
  than this fraction of its score at the current scale; 0 switches whenever strictly better.
* ``max_code_step``: candidates only within this many FP8 codes of the block's current one
  (``None``: all 126).
* ``loss_check``: evaluate held-out batches before and after (:func:`~nvfp4_qat.recalibrate`
  takes the ``evaluate`` callable). ``"model"``: a recalibration that raises the loss is rolled
  back whole; ``"layer"``: the layers' new scales are tried one at a time, in model order, and a
  layer keeps them only if the loss does not rise (one evaluation per layer).

``"mse"`` with no acceptance rule is the exact sweep of :func:`~nvfp4_qat.nvfp4_scale_sweep` and
runs through its kernels; the other policies score candidates here, in PyTorch, on the weight's
device (exact candidate values from :mod:`nvfp4_qat.format`; the float scores are ordinary fp32).
BENCHMARKS.md ("QAT quality") has the measurements that chose the presets in :data:`POLICIES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nvfp4_qat._sweep_reference import pairwise_block_sum
from nvfp4_qat.format import (
    block_code_bytes,
    e2m1_magnitude,
    fake_quantize_unchecked,
    fp8_code_values,
    fp8_scale_candidates,
    global_scale,
)

__all__ = [
    "CRITERIA",
    "LOSS_CHECKS",
    "POLICIES",
    "InputMoments",
    "RecalibrationPolicy",
    "adam_moments",
    "adam_state",
    "resolve_policy",
]

#: Candidate-scoring criteria.
CRITERIA = ("mse", "activation", "gradient")
#: ``RecalibrationPolicy.loss_check`` values.
LOSS_CHECKS = ("off", "model", "layer")
#: Extra memory of one scoring chunk (elements of a ``[blocks, candidates, 16]`` temporary).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class RecalibrationPolicy:
    """How :func:`~nvfp4_qat.recalibrate` chooses new block scales (see the module docstring).

    Attributes:
        criterion: ``"mse"``, ``"activation"`` or ``"gradient"``.
        keep_global_amax: the per-tensor amax only grows, instead of following ``max |w|``.
        min_gain: acceptance threshold per block, >= 0 (a fraction of the current score for
            ``mse``/``activation``, a signal-to-noise ratio for ``gradient``).
        max_code_step: search only this many FP8 codes around the current one (``None``: all).
        loss_check: ``"off"``, ``"model"`` (roll back a recalibration that raises the held-out
            loss) or ``"layer"`` (keep each layer's new scales only if they do not raise it).

    Raises:
        ValueError: a field out of range (the message names it).
    """

    criterion: str = "mse"
    keep_global_amax: bool = False
    min_gain: float = 0.0
    max_code_step: int | None = None
    loss_check: str = "off"

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(
                f"RecalibrationPolicy.criterion must be one of {CRITERIA}, got {self.criterion!r}"
            )
        if not isinstance(self.keep_global_amax, bool):
            raise ValueError(
                f"RecalibrationPolicy.keep_global_amax must be a bool, got {self.keep_global_amax!r}"
            )
        if self.loss_check not in LOSS_CHECKS:
            raise ValueError(
                f"RecalibrationPolicy.loss_check must be one of {LOSS_CHECKS}, got {self.loss_check!r}"
            )
        gain = self.min_gain
        if (
            isinstance(gain, bool)
            or not isinstance(gain, (int, float))
            or not gain >= 0
            or gain == float("inf")
        ):
            raise ValueError(f"RecalibrationPolicy.min_gain must be a finite number >= 0, got {gain!r}")
        step = self.max_code_step
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
            raise ValueError(f"RecalibrationPolicy.max_code_step must be None or an int >= 1, got {step!r}")

    @property
    def is_plain_sweep(self) -> bool:
        """Whether this is the exact MSE sweep with nothing else (the kernels' fast path)."""
        return self == RecalibrationPolicy()

    @property
    def checks_loss(self) -> bool:
        return self.loss_check != "off"

    @property
    def needs_optimizer(self) -> bool:
        return self.criterion == "gradient"

    @property
    def needs_input_moments(self) -> bool:
        return self.criterion == "activation"


#: Named presets (``policy="..."`` in :func:`~nvfp4_qat.recalibrate`, the callback and Hydra).
POLICIES: dict[str, RecalibrationPolicy] = {
    "mse": RecalibrationPolicy(),
    "mse_keep_global": RecalibrationPolicy(keep_global_amax=True),
    "selective": RecalibrationPolicy(keep_global_amax=True, min_gain=0.1),
    "activation": RecalibrationPolicy(criterion="activation", keep_global_amax=True),
    "gradient": RecalibrationPolicy(
        criterion="gradient", keep_global_amax=True, min_gain=1.0, max_code_step=2
    ),
    "loss_check": RecalibrationPolicy(keep_global_amax=True, loss_check="model"),
    "loss_check_layer": RecalibrationPolicy(keep_global_amax=True, loss_check="layer"),
}


def resolve_policy(policy: str | RecalibrationPolicy) -> RecalibrationPolicy:
    """A preset name or a :class:`RecalibrationPolicy` -> the policy.

    Raises:
        ValueError: an unknown name (the message lists the presets).
        TypeError: neither a string nor a policy.
    """
    if isinstance(policy, RecalibrationPolicy):
        return policy
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(
                f"policy must be one of {tuple(POLICIES)} or a RecalibrationPolicy, got {policy!r}"
            )
        return POLICIES[policy]
    raise TypeError(f"policy must be a preset name or a RecalibrationPolicy, got {type(policy).__name__}")


class InputMoments:
    """Second moments ``E[x_j^2]`` of each layer's input features, gathered by forward hooks.

    The hooks read the input of every listed layer in training-mode forwards (evaluation passes
    are not counted, unless ``training_only=False``: a calibration pass) and change nothing the
    model computes. Use as a context manager or call
    :meth:`remove`; :meth:`reset` frees the sums (the callback does it after each recalibration).

    Args:
        layers: ``(name, module)`` pairs, e.g. :func:`~nvfp4_qat.quantize.nvfp4_layers`.
        training_only: count only forwards in training mode.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], training_only: bool = True) -> None:
        self.training_only = training_only
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in layers]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if (self.training_only and not module.training) or not args:
                return
            with torch.no_grad():
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in_features)
                total = x.square().sum(dim=0)
                if name in self._sums:
                    self._sums[name] += total
                    self._counts[name] += x.shape[0]
                else:
                    self._sums[name], self._counts[name] = total, x.shape[0]

        return hook

    def get(self, name: str) -> torch.Tensor | None:
        """``E[x^2]`` per input feature (fp32 ``[in_features]``) of layer ``name``, or ``None`` if unseen."""
        if name not in self._sums:
            return None
        return self._sums[name] / self._counts[name]

    def reset(self) -> None:
        """Forget what was gathered (frees the sums)."""
        self._sums.clear()
        self._counts.clear()

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of the default process group (a collective: every
        rank calls it, with the same layers seen). Afterwards every rank holds the same moments."""
        import torch.distributed as dist

        names = sorted(self._sums)
        if not names:
            return
        flat = torch.cat(
            [self._sums[n] for n in names]
            + [torch.tensor([float(self._counts[n]) for n in names], device=self._sums[names[0]].device)]
        )
        dist.all_reduce(flat)
        parts = flat.split([self._sums[n].numel() for n in names] + [len(names)])
        for n, part, count in zip(names, parts[:-1], parts[-1].tolist(), strict=True):
            self._sums[n], self._counts[n] = part, int(count)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    def __enter__(self) -> InputMoments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """The optimizer's Adam/AdamW state of ``param`` (checked, nothing computed).

    Raises:
        ValueError: the optimizer holds no Adam state for ``param`` (not an Adam-type optimizer,
            or no step taken yet); the gradient criterion needs one.
    """
    state = optimizer.state.get(param, {})
    if "exp_avg" not in state or "exp_avg_sq" not in state:
        raise ValueError(
            "policy criterion 'gradient' needs Adam/AdamW state (exp_avg, exp_avg_sq) for every "
            f"quantized weight, but {type(optimizer).__name__} has none for a weight of shape "
            f"{tuple(param.shape)} (no optimizer step yet, or not an Adam-type optimizer)"
        )
    return state


def adam_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-corrected Adam/AdamW moments ``(m_hat, v_hat)`` of ``param`` (fp32, its shape).

    Raises:
        ValueError: as :func:`adam_state`.
    """
    state = adam_state(optimizer, param)
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    step = float(state.get("step", 1))
    m = state["exp_avg"].to(torch.float32) / (1 - beta1**step)
    v = state["exp_avg_sq"].to(torch.float32) / (1 - beta2**step)
    return m, v


def policy_scales(
    w: torch.Tensor,
    block_amax: torch.Tensor,
    g_old: torch.Tensor,
    g_new: torch.Tensor,
    policy: RecalibrationPolicy,
    feature_weight: torch.Tensor | None = None,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """New ``block_amax`` (fp32, ``block_amax``'s shape) of one layer under ``policy``; writes nothing.

    Args:
        w: the layer's full weight ``[out, in]`` (finite).
        block_amax, g_old: its current scales.
        g_new: the global amax the new scales are expressed in.
        policy: the policy (criterion ``activation`` needs ``feature_weight`` ``[in]``, criterion
            ``gradient`` needs ``moments`` ``(m, v)`` of ``w``'s shape).

    A block that keeps its scale keeps its ``block_amax`` value; if ``g_new != g_old`` its FP8
    code is re-derived from that value (the nearest code of the new grid).
    """
    n_blocks = block_amax.numel()
    wf = w.detach().to(torch.float32).reshape(n_blocks, 16)  # (n, 16)
    s2 = global_scale(g_new)
    values = fp8_code_values(w.device)  # [126], ascending
    candidates = fp8_scale_candidates(w.device)
    q_old = fake_quantize_unchecked(wf, block_amax, g_old, 16)  # (n, 16) the grid the model trained on
    h = None
    if policy.criterion == "activation":
        h = feature_weight.to(torch.float32).reshape(
            -1, 16
        )  # (in // 16, 16): block b uses row b % (in // 16)
    if policy.criterion == "gradient":
        m = moments[0].reshape(n_blocks, 16)
        v = moments[1].reshape(n_blocks, 16)
    if policy.max_code_step is None:
        offsets = None
        k_count = values.numel()
    else:
        cur = block_code_bytes(block_amax.reshape(-1), s2).to(torch.int64) - 1  # -1: scale 0
        offsets = torch.arange(-policy.max_code_step, policy.max_code_step + 1, device=w.device)
        k_count = offsets.numel()
    out = block_amax.reshape(-1).clone()
    step = max(1, _CHUNK_ELEMENTS // (16 * k_count))
    for a in range(0, n_blocks, step):
        b = min(n_blocks, a + step)
        x = wf[a:b]  # (B, 16)
        absx = x.abs()
        if offsets is None:
            idx = torch.arange(k_count, device=w.device).expand(b - a, -1)  # (B, K)
        else:
            idx = (cur[a:b, None] + offsets).clamp(0, values.numel() - 1)
        v_k = values[idx][..., None]  # (B, K, 1)
        qmag = e2m1_magnitude((absx / s2)[:, None, :], v_k) * (v_k * s2)  # (B, K, 16)
        if policy.criterion == "gradient":
            dq = torch.copysign(qmag, x[:, None, :]) - q_old[a:b, None, :]
            gain = -pairwise_block_sum(m[a:b, None, :] * dq)
            noise = pairwise_block_sum(v[a:b, None, :] * dq.square()).sqrt()
            z = torch.where(noise > 0, gain / noise, torch.zeros_like(gain))  # (B, K)
            best, k = z.max(dim=1)
            switch = best > policy.min_gain
        else:
            err = (absx[:, None, :] - qmag).square()
            cur_err = (x - q_old[a:b]).square()
            if h is not None:  # the chunk's weights, gathered per block (never a weight-sized copy)
                hb = h[torch.arange(a, b, device=w.device) % h.shape[0]]  # (B, 16)
                err = err * hb[:, None, :]
                cur_err = cur_err * hb
            score = pairwise_block_sum(err)  # (B, K)
            best, k = score.min(dim=1)  # the first minimum: the smallest code
            current = pairwise_block_sum(cur_err)
            switch = best < current * (1 - policy.min_gain)
        chosen = idx.gather(1, k[:, None]).squeeze(1)
        out[a:b] = torch.where(switch, candidates[chosen] * g_new.reshape(()), out[a:b])
    return out.reshape(block_amax.shape)
