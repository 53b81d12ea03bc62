"""Exact resume (issue 16 item 3): a run killed after a checkpoint, mid-epoch or at an epoch end, continues
with the batches, losses and learning rates of the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from cli import build_cli
from datamodules.resumable import EpochSampler, ResumableLoader, resumable_loader
from tests.datamodules.conftest import libero_datamodule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS = 8
# 3 training episodes x 6 windows = 18 windows, batches of 4: 5 batches per epoch (the last one short), so the
# run crosses an epoch boundary at step 5.
ARGS = ["--trainer.max_steps=8", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.num_episodes=4", "--data.init_args.episode_length=6",
        "--data.init_args.batch_size=4"]


class Record(Callback):
    """Loss, learning rate and the batch's first window of every training step, by global step."""

    def __init__(self):
        self.steps: dict[int, tuple[float, float, tuple[int, int]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        first = (int(batch.episode_id[0]), int(batch.frame_index[0, 0]))
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.steps[trainer.global_step] = (float(outputs["loss"]), float(lr), first)


class Killed(Exception):
    pass


class KillAt(Callback):
    """Stops the process's training dead after ``step`` (no checkpoint of that step): what kill -9 leaves."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed


def _cli(root: Path):
    return build_cli(["--config", str(CONFIGS / "tiny_align.yaml"), f"--trainer.default_root_dir={root}",
                      f"--trainer.logger.init_args.save_dir={root}", *ARGS], run=False)


def test_killed_run_resumes_mid_epoch_and_at_epoch_end_with_the_same_losses_and_lrs(tmp_path):
    straight = Record()
    cli = _cli(tmp_path / "straight")
    cli.trainer.callbacks.append(straight)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert sorted(straight.steps) == list(range(1, STEPS + 1))
    # Epoch 1 is not epoch 0 again (the old loader's fresh generator replayed epoch 0's order after a resume).
    assert [straight.steps[s][2] for s in range(6, 9)] != [straight.steps[s][2] for s in range(1, 4)]

    ckpts = tmp_path / "ckpts"
    cli = _cli(tmp_path / "killed")
    cli.trainer.callbacks += [
        Record(), KillAt(7),
        # A checkpoint after every step: step 2 is mid-epoch, step 5 the last batch of epoch 0.
        ModelCheckpoint(dirpath=ckpts, filename="{step}", every_n_train_steps=1, save_top_k=-1)]
    with pytest.raises(Killed):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    for name, first in [("step=2.ckpt", 3), ("step=5.ckpt", 6)]:
        loops = torch.load(ckpts / name, weights_only=True)["loops"]
        state = loops["fit_loop"]["state_dict"]["combined_loader"]
        assert state[0]["epoch"] == 0 and state[0]["batches"] == first - 1  # batches handed out so far
        resumed = Record()
        cli = _cli(tmp_path / f"resumed_{first}")
        cli.trainer.callbacks.append(resumed)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpts / name))
        assert sorted(resumed.steps) == list(range(first, STEPS + 1)), name
        for step, (loss, lr, window) in resumed.steps.items():
            want_loss, want_lr, want_window = straight.steps[step]
            assert window == want_window, (name, step)
            assert loss == pytest.approx(want_loss, abs=1e-6), (name, step)
            assert lr == pytest.approx(want_lr, abs=1e-6), (name, step)


def _order(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch[0]]


def test_loader_order_is_a_function_of_seed_and_epoch_and_its_state_skips_handed_out_batches():
    ds = TensorDataset(torch.arange(10))
    a, b = resumable_loader(ds, None, seed=3, batch_size=3), resumable_loader(ds, None, seed=3, batch_size=3)
    a.sampler.set_epoch(1)
    first_of_epoch1 = _order(a)
    b.sampler.set_epoch(1)
    assert _order(b) == first_of_epoch1  # a new loader (a resumed run) draws the same epoch
    a.sampler.set_epoch(2)
    assert sorted(_order(a)) == list(range(10)) and _order(a) != first_of_epoch1

    a.sampler.set_epoch(1)
    it = iter(a)
    seen = [int(i) for _ in range(2) for i in next(it)[0]]
    state = a.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 2)
    c = resumable_loader(ds, None, seed=3, batch_size=3)
    c.load_state_dict(state)
    c.sampler.set_epoch(1)
    assert seen + _order(c) == first_of_epoch1  # the rest of the epoch, nothing replayed or lost
    c.sampler.set_epoch(2)
    assert sorted(_order(c)) == list(range(10))  # the skip applied to the resumed epoch only

    done = resumable_loader(ds, None, seed=3, batch_size=3)
    done.load_state_dict({"epoch": 1, "batches": 4})  # saved at the end of epoch 1
    done.sampler.set_epoch(2)
    assert len(_order(done)) == 10  # the next epoch is whole
    with pytest.raises(ValueError, match=r"lacks \['batches'\]"):
        done.load_state_dict({"epoch": 1})
    with pytest.raises(TypeError, match="needs an EpochSampler"):
        ResumableLoader(ds, batch_size=3)


def test_real_format_datamodules_train_on_the_resumable_loader(suite, tmp_path):
    root, _ = suite
    dm = libero_datamodule(root, tmp_path, num_workers=0, batch_size=4)
    train = dm.train_dataloader()
    assert isinstance(train, ResumableLoader) and isinstance(train.sampler, EpochSampler)
    assert train.sampler.seed == dm.seed and train.drop_last
    order = [tuple(b.frame_index[:, 0].tolist()) for b in train]
    again = [tuple(b.frame_index[:, 0].tolist()) for b in dm.train_dataloader()]
    assert order == again  # same (seed, epoch), same order, from a freshly built loader
    assert not isinstance(dm.val_dataloader(), ResumableLoader)  # evaluation order is fixed anyway
