"""A callback for subprocess tests (``--trainer.callbacks+=tests.loss_recorder.LossRecorder``): every rank
appends its training loss per step to ``<dir>/losses.rank<r>.json``, and rank 0 saves the (DDP-averaged)
gradients of the first step to ``<dir>/grads0.pt``.

``shards=N`` (one process): at the first step, also the loss and gradients that N DDP processes would compute
on this batch, whose rank r gets rows r, r + N, ...: the mean of the N shard losses, and its gradients
(``<dir>/shards0.json``, ``<dir>/shard_grads0.pt``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback


def rows(batch, index: list[int]):
    """``batch`` (a Window dataclass) restricted to batch rows ``index``."""
    size = batch.batch_size
    picked = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if torch.is_tensor(v) and v.ndim and v.shape[0] == size:
            picked[f.name] = v[index]
        elif isinstance(v, list) and len(v) == size:
            picked[f.name] = [v[i] for i in index]
    return dataclasses.replace(batch, **picked)


class LossRecorder(Callback):
    def __init__(self, out_dir: str, shards: int = 0):
        self.out_dir, self.shards = Path(out_dir), shards
        self.losses: list[float] = []

    def _grads(self, module) -> dict:
        return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.shards < 2 or trainer.global_step != 0:
            return
        pl_module.zero_grad(set_to_none=True)
        parts = [pl_module.training_step(rows(batch, list(range(r, batch.batch_size, self.shards))), batch_idx)
                 for r in range(self.shards)]
        loss = sum(parts) / self.shards
        loss.backward()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self._grads(pl_module), self.out_dir / "shard_grads0.pt")
        (self.out_dir / "shards0.json").write_text(json.dumps({"loss": float(loss)}))
        pl_module.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Called after backward: under DDP the gradients are already averaged across processes.
        if trainer.global_step == 0 and trainer.global_rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(self._grads(pl_module), self.out_dir / "grads0.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"losses.rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))
