"""The training runs of ``multi_gpu_qat.py``: model, data, check callbacks, DDP and FSDP2 trainers.

The model is a Llama-style decoder (RMSNorm, SwiGLU, learned positions, untied head, no biases);
every ``nn.Linear`` but the head becomes an ``NVFP4Linear``. The data are arithmetic sequences
``t_i = (a + b * i) mod vocab`` with ``(a, b)`` drawn from the sample index: deterministic, the
same on every rank, and learnable (the loss falls), which random tokens are not.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import os
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

from nvfp4_qat import NVFP4Recalibration, QATConfig, quantize_model
from nvfp4_qat.quantize import nvfp4_layers
from nvfp4_qat.sweep import nvfp4_scale_sweep

#: ``1b``: 1,058,088,960 parameters, 924,844,032 of them in the 90 quantized linear layers.
PRESETS = {
    "1b": dict(vocab=32000, seq=1024, d=2048, n_layer=18, n_head=16, ffn=5632),
    "tiny": dict(vocab=256, seq=32, d=64, n_layer=2, n_head=4, ffn=128),
}
QAT = QATConfig(exclude=("*lm_head",), init_calibration="max")  # the MSE sweep runs at fit start


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, ffn: int) -> None:
        super().__init__()
        self.n_head, self.math_attention = n_head, False
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, ffn, bias=False)
        self.up = nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, t, 3, self.n_head, d // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (b, n_head, t, head_dim)
        if self.math_attention:  # plain matmuls: deterministic, for the resume comparison
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class DecoderLM(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, n_layer: int, n_head: int, ffn: int) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, n_head, ffn) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (b, t) -> (b, t, vocab)
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class ArithmeticTokens(Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = torch.randint(self.vocab, (2,), generator=torch.Generator().manual_seed(i))
        tokens = (a + b * torch.arange(self.seq + 1)) % self.vocab
        return tokens[:-1], tokens[1:]


def shard(model: DecoderLM, mesh) -> None:
    """FSDP2: one parameter group per block, the rest (embeddings, head) in the root's."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


class LitLM(pl.LightningModule):
    def __init__(self, preset: str, device: torch.device, fsdp: bool, math_attention: bool, lr: float = 3e-4):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every rank (FSDP2 keeps each rank's rows)
        with torch.device(device):
            self.model = DecoderLM(**PRESETS[preset])
        for block in self.model.blocks:
            block.math_attention = math_attention
        self.fsdp, self.lr, self.last_loss = fsdp, lr, None

    def configure_model(self) -> None:
        # Runs after the callback's setup(), so the NVFP4Linear layers are already in place.
        if self.fsdp and not isinstance(self.model.lm_head.weight, DTensor):
            shard(self.model, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1).float(), y.flatten())
        self.last_loss = loss.detach()
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def timing_model(args, device: torch.device | str, fsdp: bool) -> nn.Module:
    """The benchmark model, quantized (max init), sharded by FSDP2 over all ranks if ``fsdp``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = quantize_model(DecoderLM(**PRESETS[args.preset]), QAT)
    if fsdp:
        shard(model, init_device_mesh(torch.device(device).type, (dist.get_world_size(),)))
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t  # a collective for DTensor


class ScaleCheck(Callback):
    """After each recalibration of ``recal``: scales equal across ranks and equal to a fresh
    single-process sweep of each full weight. Every rank takes part (collectives)."""

    def __init__(self, recal: NVFP4Recalibration, run: str) -> None:
        self.recal, self.run, self.seen, self.results = recal, run, 0, []

    def on_train_start(self, trainer, pl_module) -> None:
        # The history is restored by now (FSDP2 restores after on_fit_start); a fresh run's only
        # entry is the fit-start calibration, which this checks.
        self.seen = len(self.recal.history) - (trainer.global_step == 0 and bool(self.recal.history))
        self._maybe_check(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_check(trainer, pl_module)

    @torch.no_grad()
    def _maybe_check(self, trainer, pl_module) -> None:
        if len(self.recal.history) == self.seen:
            return
        self.seen = len(self.recal.history)
        start = time.perf_counter()
        layers = [m for _, m in nvfp4_layers(pl_module)]
        flat = torch.cat([torch.cat([m.global_amax.reshape(1), m.block_amax.reshape(-1)]) for m in layers])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        counts = torch.zeros(2, dtype=torch.int64, device=flat.device)
        counts[0] = (flat != reference).sum()
        for m in layers:
            w = _full(m.weight.detach())
            g = torch.linalg.vector_norm(w, float("inf")).to(torch.float32)
            block = nvfp4_scale_sweep(w, g, backend=self.recal.backend, method=self.recal.method)
            counts[1] += (block.reshape(m.block_amax.shape) != m.block_amax).sum() + (g != m.global_amax)
        dist.all_reduce(counts)
        across, swept = counts.tolist()
        self.results.append({
            "run": self.run, "step": trainer.global_step, "reason": self.recal.history[-1]["reason"],
            "ranks_equal": across == 0, "sweep_equal": swept == 0, "elements_differing_across_ranks": across,
            "blocks_differing_from_sweep": swept, "check_s": time.perf_counter() - start,
        })  # fmt: skip


class FinalState(Callback):
    """At the end of training: this rank's scale buffers and (rank 0) digests of the full weights."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.scales = {
            n: b.detach().cpu().clone() for n, b in pl_module.named_buffers() if n.endswith("amax")
        }
        self.weights = {}
        for name, p in pl_module.named_parameters():
            full = _full(p.detach())
            if dist.get_rank() == 0:
                data = full.cpu().contiguous().view(torch.uint8).numpy()
                self.weights[name] = hashlib.sha256(data).hexdigest()
        self.loss = float(pl_module.last_loss)


class MidRunCheckpoint(Callback):
    """Saves one checkpoint, after optimizer step ``step`` (listed last: after the recalibration).

    With ``step`` the last step of an epoch, Lightning resumes at the start of the next epoch with
    the same batches. (A checkpoint written in ``on_train_epoch_end``, as ``ModelCheckpoint(
    save_on_train_epoch_end=True)`` does, resumes with a shifted sampler epoch in Lightning 2.6:
    one extra step labelled as the old epoch, then other batches than the uninterrupted run.)
    """

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)  # every rank calls it; FSDP2 writes a folder of shards


class StepTimer(Callback):
    """Time stamps at the end of every step, after the recalibration callback (listed before it)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    def result(self, warmup: int, tokens_per_step: int) -> dict:
        t = self.stamps[warmup - 1 :]
        steps = [b - a for a, b in zip(t[:-1], t[1:], strict=True)]
        return {
            "steps": len(steps), "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step * len(steps) / (t[-1] - t[0]),
            "median_step_ms": 1e3 * statistics.median(steps), "mean_step_ms": 1e3 * (t[-1] - t[0]) / len(steps),
        }  # fmt: skip


def _trainer(args, strategy: str, max_steps: int, callbacks: list, root: Path, deterministic: bool, **kw):
    world = dist.get_world_size()
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if strategy == "ddp":
        strat = DDPStrategy()
    else:
        strat = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator=args.accelerator, devices=devices, num_nodes=world // devices, strategy=strat,
        precision=args.precision, max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        deterministic="warn" if deterministic else False, log_every_n_steps=1, **kw,
    )  # fmt: skip


def _loader(args, steps_per_epoch: int) -> DataLoader:
    p = PRESETS[args.preset]
    n = steps_per_epoch * args.micro_batch * dist.get_world_size()
    return DataLoader(ArithmeticTokens(n, p["seq"], p["vocab"]), batch_size=args.micro_batch, drop_last=True)


def _callback(args, every: int) -> NVFP4Recalibration:
    return NVFP4Recalibration(policy="mse", settle_fraction=0.0, every_n_train_steps=every, quant_config=QAT)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _all(flag: bool, device: torch.device) -> bool:
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def run_check_and_resume(args, strategy: str, device: torch.device, root: Path) -> dict:
    """Uninterrupted run (checks after every recalibration, checkpoint at half) and a run resumed
    from that checkpoint; both end at ``args.steps``."""
    fsdp, half = strategy == "fsdp2", args.steps // 2
    math_attention = args.deterministic and device.type == "cuda"
    runs = {}
    for run in ("uninterrupted", "resumed"):
        recal = _callback(args, args.recal_every)
        check, final = ScaleCheck(recal, run), FinalState()
        ckpt = root / "mid_run.ckpt"
        if run == "uninterrupted":
            extra, fit_kw, kw = (
                [MidRunCheckpoint(ckpt, half)],
                {},
                {"logger": CSVLogger(root, name="logs", version=0)},
            )
        else:
            extra, fit_kw, kw = [], {"ckpt_path": ckpt}, {}
        model = LitLM(args.preset, device, fsdp, math_attention)
        trainer = _trainer(
            args, strategy, args.steps, [recal, check, final, *extra], root, args.deterministic, **kw
        )
        trainer.fit(model, _loader(args, half), **fit_kw)
        runs[run] = (recal, check, final)
        del trainer, model
        _free()
    (rec_a, check_a, final_a), (rec_b, check_b, final_b) = runs["uninterrupted"], runs["resumed"]
    scales_equal = _all(all(torch.equal(t, final_b.scales[n]) for n, t in final_a.scales.items()), device)
    weights_equal = _all(final_a.weights == final_b.weights, device)
    logged = [None]  # the steps at which rank 0's logger wrote the callback's metrics
    if dist.get_rank() == 0:
        with open(root / "logs" / "version_0" / "metrics.csv") as f:
            logged = [[int(r["step"]) for r in csv.DictReader(f) if r.get("nvfp4/mse_after")]]
    dist.broadcast_object_list(logged, src=0)
    return {
        "checks": check_a.results + check_b.results,
        "history": rec_a.history,
        "logged_recal_steps": logged[0],
        "final_loss": final_a.loss,
        "resume": {
            "resume_step": half,
            "scales_equal": scales_equal,
            "weights_equal": weights_equal,
            "recal_steps_equal": [(h["step"], h["reason"]) for h in rec_a.history]
            == [(h["step"], h["reason"]) for h in rec_b.history],
            "recal_steps": [h["step"] for h in rec_a.history],
        },
    }


def run_throughput(args, strategy: str, device: torch.device, root: Path) -> dict:
    """Tokens/s over ``args.throughput_steps`` steps after ``args.warmup_steps``, three ways."""
    steps = args.warmup_steps + args.throughput_steps
    p = PRESETS[args.preset]
    tokens = args.micro_batch * p["seq"] * dist.get_world_size()
    out = {}
    for label, every in (
        (f"{args.precision}, no QAT", None),
        ("QAT, scales from fit start only", 0),
        (f"QAT, recalibrate every {args.recal_every} steps", args.recal_every),
    ):
        timer = StepTimer(device)
        callbacks = [timer] if every is None else [_callback(args, every), timer]
        model = LitLM(args.preset, device, strategy == "fsdp2", math_attention=False)
        trainer = _trainer(args, strategy, steps, callbacks, root, deterministic=False)
        trainer.fit(model, _loader(args, steps))
        out[label] = timer.result(args.warmup_steps, tokens)
        if every:
            out[label]["recalibrations_measured"] = sum(
                args.warmup_steps < h["step"] <= steps for h in callbacks[0].history
            )
        del trainer, model
        _free()
    return out
