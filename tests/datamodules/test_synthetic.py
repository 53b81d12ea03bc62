"""SyntheticWindowDataModule: the real datamodules' Window layout, exact action shifts and padding, and data
that a model can actually learn from."""

from __future__ import annotations

import pytest
import torch

from datamodules.synthetic import ARM_STEP, FINGER_OPEN, SyntheticWindowDataModule
from vitavla.batch import Window

SMALL = dict(num_episodes=4, episode_length=12, num_steps=5, image_size=32, batch_size=4)



def _all_windows(dm: SyntheticWindowDataModule, ids=None) -> list[tuple[int, int, dict]]:
    ds = dm._dataset(ids if ids is not None else list(range(len(dm.episodes))))
    return [(ds.episodes[i].episode_id, start, ds[k]) for k, (i, start) in enumerate(ds.index)]


@pytest.mark.parametrize("arm,grip,gripper_state", [(6, 1, "binary"), (12, 2, "binary"), (6, 1, "width")])
def test_batches_match_the_robot_spec(arm, grip, gripper_state):
    dm = SyntheticWindowDataModule(**SMALL, arm_dim=arm, gripper_dim=grip, gripper_state=gripper_state)
    assert (dm.robot.arm_dim, dm.robot.gripper_dim, dm.robot.action_chunk) == (arm, grip, 3)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert isinstance(batch, Window)
        batch.validate(dm.robot, image_size=32, require_actions=True)
        b = batch.batch_size
        assert batch.images.shape == (b, 5, 2, 3, 32, 32) and batch.images.dtype == torch.uint8
        assert batch.state.dtype == batch.actions.dtype == torch.float32
        assert batch.actions.shape == (b, 5, 3, arm + grip)
        assert batch.episode_id.shape == (b,) and batch.frame_index.shape == (b, 5)
        assert all(isinstance(s, str) and s for s in batch.instruction)
    ep = dm.episodes[0]
    assert ep.actions[:, :arm].abs().max() <= 1.0
    assert set(ep.actions[:, arm:].unique().tolist()) <= {0.0, 1.0}
    grip_state = ep.state[:, arm:]
    allowed = {0.0, FINGER_OPEN} if gripper_state == "width" else {0.0, 1.0}
    assert torch.isin(grip_state, torch.tensor(sorted(allowed))).all()


def test_action_labels_are_shifted_episode_actions():
    dm = SyntheticWindowDataModule(**SMALL)
    by_id = {ep.episode_id: ep for ep in dm.episodes}
    for episode_id, start, w in _all_windows(dm):
        ep = by_id[episode_id]
        assert w["instruction"] == ep.instruction
        for t in range(5):
            for j in range(3):
                if start + t + j < ep.length:
                    assert w["action_valid"][t, j]
                    assert torch.equal(w["actions"][t, j], ep.actions[start + t + j])
            if start + t < ep.length:
                assert w["valid"][t] and w["frame_index"][t] == start + t
                assert torch.equal(w["state"][t], ep.state[start + t])


def test_padding_and_masks_at_episode_end():
    dm = SyntheticWindowDataModule(**SMALL)
    arm = dm.robot.arm_dim
    ep = dm.episodes[0]
    last = ep.length - 1
    windows = {start: w for eid, start, w in _all_windows(dm) if eid == ep.episode_id}
    assert sorted(windows) == list(range(ep.length)), "a window must start at every frame"

    w = windows[last - 1]  # two real steps, three padding steps
    assert w["valid"].tolist() == [True, True, False, False, False]
    assert w["action_valid"].tolist() == [[True, True, False]] + [[True, False, False]] + [[False] * 3] * 3
    for t in range(2, 5):
        assert torch.equal(w["images"][t], w["images"][1]), "padding images repeat the last frame"
        assert torch.equal(w["state"][t], ep.state[last])
        assert w["frame_index"][t] == last
    invalid = ~w["action_valid"]
    assert (w["actions"][..., :arm][invalid] == 0).all(), "padding arm actions must be zero"
    assert (w["actions"][..., arm:][invalid] == ep.actions[last, arm:]).all(), "padding repeats the gripper"

    # A window that ends exactly at the last frame is real everywhere but its chunk tails.
    w = windows[last - 4]
    assert w["valid"].all()
    assert w["action_valid"][:, 0].all() and not w["action_valid"][-1, 1:].any()


def test_expert_dynamics():
    dm = SyntheticWindowDataModule(**SMALL)
    arm = dm.robot.arm_dim
    for ep in dm.episodes:
        torch.testing.assert_close(ep.state[1:, :arm], ep.state[:-1, :arm] + ARM_STEP * ep.actions[:-1, :arm])
        assert torch.equal(ep.state[1:, arm:], ep.actions[:-1, arm:]), "gripper state = previous command"
        assert (ep.state[0, arm:] == 1).all(), "episodes start open"


def test_images_carry_the_cue():
    dm = SyntheticWindowDataModule(**SMALL)
    a, b = dm.episodes[0], dm.episodes[1]
    ds = dm._dataset([0, 1])
    img_a, img_b = ds[0]["images"][0, 0], ds[a.length]["images"][0, 0]
    assert not torch.equal(img_a, img_b)
    assert not torch.equal(a.cue, b.cue)
    # The end-effector marker moves as the arm moves, so consecutive frames differ.
    assert not torch.equal(ds[0]["images"][0], ds[0]["images"][1])


def test_deterministic_by_seed():
    def first_batch(seed):
        return next(iter(SyntheticWindowDataModule(**SMALL, seed=seed).train_dataloader()))

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    for name in ("images", "state", "actions", "valid", "action_valid", "episode_id", "frame_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.instruction == b.instruction
    assert not torch.equal(a.actions, c.actions)


def test_split_by_episode():
    dm = SyntheticWindowDataModule(num_episodes=8, episode_length=6, num_steps=3, image_size=16,
                                   val_fraction=0.25)
    assert len(dm.val_episode_ids) == 2 and len(dm.train_episode_ids) == 6
    assert set(dm.train_episode_ids).isdisjoint(dm.val_episode_ids)
    val_ids = {int(i) for batch in dm.val_dataloader() for i in batch.episode_id}
    train_ids = {int(i) for batch in dm.train_dataloader() for i in batch.episode_id}
    assert val_ids == set(dm.val_episode_ids) and train_ids == set(dm.train_episode_ids)
    assert len(dm.train_dataloader().dataset) == 6 * 6
    assert SyntheticWindowDataModule(num_episodes=1, val_fraction=0.0).val_dataloader() == []
    with pytest.raises(ValueError, match="num_episodes >= 2"):
        SyntheticWindowDataModule(num_episodes=1)


def test_worker_processes():
    dm = SyntheticWindowDataModule(**{**SMALL, "num_workers": 1})
    batch = next(iter(dm.train_dataloader()))
    batch.validate(dm.robot, image_size=32, require_actions=True)


def test_learnable():
    """A small model fits the data quickly: the demo's loss curves are meant to go down."""
    from teachers.transformer_teacher import TransformerTeacher

    dm = SyntheticWindowDataModule(num_episodes=4, episode_length=12, num_steps=4, image_size=32,
                                   batch_size=8, val_fraction=0.0)
    model = TransformerTeacher(image_size=32, hidden_size=64, arm_dim=dm.robot.arm_dim)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    while len(losses) < 80:
        for batch in dm.train_dataloader():
            loss, _ = model.training_loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("val_fraction", [0.25, 0.0])
def test_lightning_fit(tmp_path, val_fraction):
    from lightning.pytorch import LightningModule, Trainer

    from teachers.transformer_teacher import TransformerTeacher

    class TeacherModule(LightningModule):
        def __init__(self):
            super().__init__()
            self.teacher = TransformerTeacher(image_size=32, hidden_size=32)

        def training_step(self, batch, batch_idx):
            return self.teacher.training_loss(batch)[0]

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.teacher.training_loss(batch)[0], batch_size=batch.batch_size)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    dm = SyntheticWindowDataModule(**{**SMALL, "val_fraction": val_fraction})
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                      default_root_dir=tmp_path, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TeacherModule(), datamodule=dm)
    assert trainer.global_step == 2
    assert ("val_loss" in trainer.callback_metrics) == (val_fraction > 0)
