"""CPUDeepSpeedStrategy trains on CPU, and resolve_strategy picks it only where a run has no CUDA."""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from vitavla.strategies import CPUDeepSpeedStrategy, resolve_strategy

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed extra not installed")


class _Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.fixture
def restore_process_env():
    """DeepSpeed writes MASTER_ADDR/RANK/... into os.environ and opens a process group; undo both."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.deepspeed
@needs_deepspeed
def test_cpu_deepspeed_stage2_trains(tmp_path, monkeypatch, restore_process_env):
    torch.manual_seed(0)
    model = _Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g))
    trainer = Trainer(strategy=CPUDeepSpeedStrategy(stage=2), accelerator="cpu", devices=1, max_steps=2,
                      default_root_dir=tmp_path / "root", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    # A private CWD: anything written relative to it (logs, checkpoints, DeepSpeed files) would show up here.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=4))
    # Reported with -s; the first run on a machine includes DeepSpeed's ~50 s JIT compile of its shm op.
    print(f"\nCPUDeepSpeedStrategy stage-2 fit: {time.perf_counter() - start:.1f} s")
    assert trainer.global_step == 2
    after = list(model.parameters())
    assert all(a.shape == b.shape for a, b in zip(after, before))
    changed = [not torch.equal(a.detach().cpu(), b) for a, b in zip(after, before)]
    assert any(changed), "parameters did not change"
    assert not any(cwd.iterdir()), f"training wrote into the working directory: {sorted(os.listdir(cwd))}"


def test_resolve_strategy_leaves_non_presets_alone():
    sentinel = object()
    assert resolve_strategy(sentinel, "cpu") is sentinel
    assert resolve_strategy("ddp", "cpu") == "ddp"
    assert resolve_strategy("auto", None) == "auto"


def test_resolve_strategy_keeps_preset_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_strategy("deepspeed_stage_2", "auto") == "deepspeed_stage_2"
    assert resolve_strategy("deepspeed_stage_3", "gpu") == "deepspeed_stage_3"


@needs_deepspeed
@pytest.mark.parametrize("name,stage", [("deepspeed_stage_2", 2), ("deepspeed_stage_3", 3), ("deepspeed", 2)])
def test_resolve_strategy_maps_presets_on_cpu(monkeypatch, name, stage):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    resolved = resolve_strategy(name, "auto")
    assert isinstance(resolved, CPUDeepSpeedStrategy)
    assert resolved.config["zero_optimization"]["stage"] == stage
    # An explicit CPU accelerator wins even where CUDA exists.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert isinstance(resolve_strategy(name, "cpu"), CPUDeepSpeedStrategy)


def test_missing_deepspeed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator", None)
    with pytest.raises(ImportError, match=r"vitavla\[deepspeed\]"):
        CPUDeepSpeedStrategy(stage=2)


@needs_deepspeed
def test_registered_by_name():
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = StrategyRegistry.get("deepspeed_cpu_stage_3")
    assert isinstance(strategy, CPUDeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 3
