"""The plan of one recalibration, resolved once: which layers, which policy, which backend, and
which execution (fused GPU path, generic path, a policy's scorer; in this process or split across
the ranks). Every argument is checked here, before anything is computed or written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nvfp4_qat._backend import resolve_backend
from nvfp4_qat._validation import BACKENDS, METHODS, check_choice
from nvfp4_qat.modules import NVFP4Linear
from nvfp4_qat.policy import InputMoments, RecalibrationPolicy, adam_state, resolve_policy
from nvfp4_qat.quantize import nvfp4_layers
from nvfp4_qat.recalibration._layers import ON_NONFINITE

__all__ = ["EXECUTIONS", "RecalibrationPlan", "distributed_world_size", "resolve_plan"]

#: ``"fused"``: the GPU fast path (stats and sweep kernels for all layers, one host sync);
#: ``"generic"``: layer by layer through the public kernels or the PyTorch reference;
#: ``"policy"``: a policy other than the plain MSE sweep scores the candidates (PyTorch).
EXECUTIONS = ("fused", "generic", "policy")


def distributed_world_size() -> int:
    """The default process group's size, or 1 when ``torch.distributed`` is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class RecalibrationPlan:
    """How one :func:`~nvfp4_qat.recalibrate` call runs (built by :func:`resolve_plan`)."""

    layers: list[tuple[str, NVFP4Linear]]
    policy: RecalibrationPolicy
    #: The sweep backend, resolved for the layers' device: ``"triton"`` or ``"reference"``.
    backend: str
    method: str
    on_nonfinite: str
    #: One of :data:`EXECUTIONS`.
    execution: str
    #: Ranks that share the sweep (1: this process does all of it).
    world: int
    #: The layers' fake-quant backend, resolved (``"triton"``, ``"reference"`` or ``"mixed"``).
    fake_quant_backend: str

    @property
    def label(self) -> str:
        """``execution``, with ``"distributed-"`` in front when the ranks share the work."""
        return f"distributed-{self.execution}" if self.world > 1 else self.execution


def resolve_plan(
    model: nn.Module,
    backend: str,
    method: str,
    on_nonfinite: str,
    policy: str | RecalibrationPolicy,
    distributed: bool | None,
) -> RecalibrationPlan:
    """Check :func:`~nvfp4_qat.recalibrate`'s arguments and decide how it runs.

    The backend rule (:func:`~nvfp4_qat._backend.resolve_backend`) is applied here once, for the
    devices the layers are on; the fused path is chosen when the sweep and every layer's
    fake-quant resolve to Triton on one device (the fused path reads the fake-quant kernel's
    cached bytes and installs the new ones).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(backend, BACKENDS, "backend")
    check_choice(method, METHODS, "method")
    check_choice(on_nonfinite, ON_NONFINITE, "on_nonfinite")
    if distributed not in (None, True, False):
        raise TypeError(f"distributed must be None (auto), True or False, got {distributed!r}")
    chosen = resolve_policy(policy)
    layers = nvfp4_layers(model)
    if not layers:
        raise ValueError("model holds no NVFP4Linear layers; prepare it with quantize_model() first")
    # One pass over the layers, and one resolution per distinct (backend, device): per layer it
    # cost ~1 ms of host time before the first GPU work on a 224-layer model.
    devices, pairs = set(), set()
    for _, m in layers:
        w, b, _ = m.quant_tensors()
        devices.update((w.device, b.device))
        pairs.add((m.fake_quant_backend, w.device))
    sweeps = {resolve_backend(backend, d) for d in devices}  # raises for an impossible "triton"
    resolved = "triton" if sweeps == {"triton"} else "reference"
    fq = {resolve_backend(b, d, name="fake_quant_backend") for b, d in pairs}
    fake_quant = fq.pop() if len(fq) == 1 else "mixed"
    if not chosen.is_plain_sweep:
        execution = "policy"
    elif resolved == "triton" and fake_quant == "triton" and len(devices) == 1:
        execution = "fused"
    else:
        execution = "generic"
    # None and True split the work when a process group of several ranks exists (without one,
    # this process is the whole world); False keeps all of it in this process.
    world = 1 if distributed is False else distributed_world_size()
    return RecalibrationPlan(layers, chosen, resolved, method, on_nonfinite, execution, world, fake_quant)


def check_policy_inputs(
    plan: RecalibrationPlan,
    optimizer: torch.optim.Optimizer | None,
    input_moments: InputMoments | None,
    evaluate: Callable[[], float] | None,
) -> None:
    """Refuse a policy whose inputs are missing, before anything is computed or written."""
    policy, layers = plan.policy, plan.layers
    if policy.needs_optimizer:
        if optimizer is None:
            raise ValueError(
                "policy criterion 'gradient' needs the training optimizer (recalibrate(..., "
                "optimizer=opt)); outside training use policy='mse'"
            )
        if plan.world > 1 and any(type(m.weight.data) is not torch.Tensor for _, m in layers):
            raise ValueError(
                "policy criterion 'gradient' is not supported with sharded weights (FSDP2): the "
                "optimizer state is sharded too; use a policy without it (e.g. policy='mse')"
            )
        for _, m in layers:
            adam_state(optimizer, m.weight)  # raises with a clear message; computes nothing
    if policy.needs_input_moments:
        if input_moments is None:
            raise ValueError(
                "policy criterion 'activation' needs input statistics: pass input_moments="
                "InputMoments(nvfp4_layers(model)) and run training forwards before recalibrating"
            )
        missing = [name for name, _ in layers if input_moments.get(name) is None]
        if missing:
            raise ValueError(
                f"policy criterion 'activation': no input statistics for layer {missing[0]!r}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                + " (run training-mode forwards with the InputMoments hooks before recalibrating)"
            )
    if policy.checks_loss and not callable(evaluate):
        raise ValueError("a policy with loss_check needs evaluate=<callable returning the held-out loss>")
