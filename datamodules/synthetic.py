"""SYNTHETIC data for smoke tests and the CPU demo. Not a real dataset: no robot, no simulator, no files.

:class:`SyntheticWindowDataModule` yields :class:`~vitavla.batch.Window` batches with exactly the layout the
real datamodules produce (uint8 two-view images, instruction strings, state, 3-step action chunks, masks,
windows truncated and padded at episode ends), generated from a seed in memory.

The data is learnable on purpose, so a demo's losses visibly fall. Every episode has an instruction (one of
four, naming a colour) and a target square drawn in the static view; the arm goal is a fixed function of the
instruction and the square's position. The expert moves the arm toward the goal,
``state[t+1] = state[t] + 0.08 * action[t]`` with ``action = clip(2 * (goal - state), -1, 1)``, and closes
gripper ``k`` once the arm is within a threshold of the goal. So actions follow from what a model sees:
instruction + static image (goal) and state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.resumable import resumable_loader
from vitavla.batch import RobotSpec, collate_windows

INSTRUCTIONS = ("move to the red square", "reach the green square", "go to the blue square",
                "touch the yellow square")
COLORS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40))
ARM_STEP = 0.08
"""State change per unit of arm action."""
GAIN = 2.0
"""Proportional gain of the expert (arm action = gain * distance to goal, clipped to [-1, 1])."""
FINGER_OPEN = 0.04
"""Finger position of an open gripper when the state carries widths (``gripper_state="width"``)."""


@dataclass
class SyntheticEpisode:
    """The source arrays of one episode; windows are cut from these, images are drawn from them on access."""

    episode_id: int
    instruction_id: int
    instruction: str
    cue: Tensor
    """(2,) centre (x, y) of the target square in the static view, in [0, 1] image coordinates."""
    goal: Tensor
    """(arm_dim,) arm state the expert moves to."""
    state: Tensor
    """(L, state_dim) robot state at every frame."""
    actions: Tensor
    """(L, action_dim) expert action at every frame: arm in [-1, 1], gripper target (1 = open)."""
    background: tuple[int, int, int]

    @property
    def length(self) -> int:
        return self.state.shape[0]


def _paint(img: Tensor, cx: float, cy: float, size: int, color) -> None:
    """Fill a ``size`` square centred at (cx, cy) in [0, 1] coordinates, clipped inside the image."""
    _, h, w = img.shape
    x0 = int(round(min(max(cx, 0.0), 1.0) * (w - size)))
    y0 = int(round(min(max(cy, 0.0), 1.0) * (h - size)))
    for c, value in enumerate(color):
        img[c, y0:y0 + size, x0:x0 + size] = value


def render(ep: SyntheticEpisode, frame: int, image_size: int, robot: RobotSpec) -> Tensor:
    """uint8 (2, 3, H, W): view 0 shows the target square and the end effector; view 1 (wrist) shows the
    target relative to the arm and a bar that is bright while the gripper is open."""
    size = max(2, image_size // 8)
    s = ep.state[frame]
    views = torch.empty(2, 3, image_size, image_size, dtype=torch.uint8)
    for c, value in enumerate(ep.background):
        views[0, c].fill_(value)
        views[1, c].fill_(value // 2)
    color = COLORS[ep.instruction_id]
    _paint(views[0], float(ep.cue[0]), float(ep.cue[1]), size, color)
    _paint(views[0], float(s[0] + 1) / 2, float(s[1 % robot.arm_dim] + 1) / 2, max(1, size // 2), (255,) * 3)
    offset = ep.goal[:2] - s[:2] if robot.arm_dim > 1 else torch.cat([ep.goal[:1] - s[:1]] * 2)
    _paint(views[1], 0.5 + float(offset[0]) / 2, 0.5 + float(offset[1]) / 2, size, color)
    open_value = FINGER_OPEN if robot.gripper_state == "width" else 1.0
    opened = 255 if float(s[robot.arm_dim]) > 0.5 * open_value else 0
    views[1, :, -max(1, image_size // 16):, :] = opened
    return views


def generate_episodes(num_episodes: int, episode_length: int, robot: RobotSpec,
                      seed: int) -> list[SyntheticEpisode]:
    """Deterministic expert episodes (see the module doc for the dynamics)."""
    g = torch.Generator().manual_seed(seed)
    # One fixed "world": how each instruction maps the square's position (x, y, bias) to an arm goal.
    mixing = torch.randn(len(INSTRUCTIONS), robot.arm_dim, 3, generator=g)
    thresholds = torch.linspace(0.08, 0.2, robot.gripper_dim)
    episodes = []
    for e in range(num_episodes):
        instr = int(torch.randint(len(INSTRUCTIONS), (1,), generator=g))
        cue = torch.rand(2, generator=g) * 0.7 + 0.15
        goal = 0.8 * torch.tanh(mixing[instr] @ torch.cat([cue * 2 - 1, torch.ones(1)]))
        arm = torch.rand(robot.arm_dim, generator=g) - 0.5
        background = tuple(int(c) for c in torch.randint(60, 140, (3,), generator=g))
        grip = torch.ones(robot.gripper_dim)  # episodes start with open grippers
        states, actions = [], []
        for _ in range(episode_length):
            if robot.gripper_state == "width":
                grip_state = (grip * FINGER_OPEN).repeat_interleave(2)
            else:
                grip_state = grip.clone()
            states.append(torch.cat([arm, grip_state]))
            arm_action = (GAIN * (goal - arm)).clamp(-1.0, 1.0)
            dist = (goal - arm).norm() / robot.arm_dim ** 0.5
            grip = (dist >= thresholds).float()
            actions.append(torch.cat([arm_action, grip]))
            arm = arm + ARM_STEP * arm_action
        episodes.append(SyntheticEpisode(e, instr, INSTRUCTIONS[instr], cue, goal, torch.stack(states),
                                         torch.stack(actions), background))
    return episodes


class SyntheticWindows(Dataset):
    """One window per (episode, start frame); windows starting near an episode's end are padded."""

    def __init__(self, episodes: list[SyntheticEpisode], num_steps: int, image_size: int, robot: RobotSpec):
        self.episodes, self.num_steps, self.image_size, self.robot = episodes, num_steps, image_size, robot
        self.index = [(i, f) for i, ep in enumerate(episodes) for f in range(ep.length)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict:
        i, start = self.index[idx]
        ep = self.episodes[i]
        last = ep.length - 1
        steps = torch.arange(start, start + self.num_steps)
        frames = steps.clamp(max=last)  # padding steps repeat the last frame
        # The label of (t, j) is the action at t + j.
        chunk = steps[:, None] + torch.arange(self.robot.action_chunk)
        action_valid = chunk <= last
        actions = ep.actions[chunk.clamp(max=last)].clone()
        # Past the end the arm stays still and the gripper keeps its last command.
        actions[..., : self.robot.arm_dim][~action_valid] = 0.0
        # Images are drawn on access (microseconds per frame) instead of cached: the cache would be
        # episodes x length x 2 views x 3 x H x W bytes, 115 MB at the defaults.
        images = torch.stack([render(ep, int(f), self.image_size, self.robot) for f in frames])
        return {
            "images": images,
            "instruction": ep.instruction,
            "state": ep.state[frames],
            "valid": steps <= last,
            "actions": actions,
            "action_valid": action_valid,
            "episode_id": torch.tensor(ep.episode_id),
            "frame_index": frames,
        }


class SyntheticWindowDataModule(LightningDataModule):
    """SYNTHETIC Window batches for smoke tests and the CPU demo (not a real dataset; see the module doc).

    Args:
        num_episodes, episode_length: how many expert episodes and how many frames each.
        num_steps: steps ``T`` per window; a window starts at every frame of every episode.
        image_size: side of the square uint8 images.
        batch_size, num_workers: DataLoader settings.
        arm_dim, gripper_dim, gripper_state, action_chunk: the robot, see :class:`~vitavla.batch.RobotSpec`.
        val_fraction: share of episodes (not windows) held out for validation and test.
        seed: everything (episodes, split, shuffling) is a function of it.
    """

    def __init__(self, num_episodes: int = 16, episode_length: int = 24, num_steps: int = 10,
                 image_size: int = 224, batch_size: int = 4, num_workers: int = 0, arm_dim: int = 6,
                 gripper_dim: int = 1, gripper_state: str = "binary", val_fraction: float = 0.25,
                 seed: int = 0, action_chunk: int = 3):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction > 0 and num_episodes < 2:
            raise ValueError(f"a validation split needs num_episodes >= 2, got {num_episodes}; "
                             "set val_fraction=0 for a single episode")
        if episode_length < 1 or num_steps < 1:
            raise ValueError(f"episode_length and num_steps must be positive, "
                             f"got {episode_length}, {num_steps}")
        self.save_hyperparameters()
        self._robot = RobotSpec(arm_dim=arm_dim, gripper_dim=gripper_dim, gripper_state=gripper_state,
                                action_chunk=action_chunk)
        self.num_steps, self.image_size = num_steps, image_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        # Tiny low-dimensional arrays: generated right away so every process of a DDP run holds the same data.
        self.episodes = generate_episodes(num_episodes, episode_length, self._robot, seed)
        order = torch.randperm(num_episodes, generator=torch.Generator().manual_seed(seed + 1)).tolist()
        n_val = min(max(round(num_episodes * val_fraction), 1), num_episodes - 1) if val_fraction > 0 else 0
        self.val_episode_ids = sorted(order[:n_val])
        self.train_episode_ids = sorted(order[n_val:])

    @property
    def robot(self) -> RobotSpec:
        return self._robot

    def _dataset(self, ids: list[int]) -> SyntheticWindows:
        return SyntheticWindows([self.episodes[i] for i in ids], self.num_steps, self.image_size, self._robot)

    def _loader(self, ids: list[int], shuffle: bool) -> DataLoader:
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_windows,
                      persistent_workers=self.num_workers > 0)
        if shuffle:
            # The order of epoch e is a function of (seed, e) and the position is checkpointed: a resumed run
            # continues with the next batch of the uninterrupted run (datamodules/resumable.py).
            return resumable_loader(self._dataset(ids), self.trainer, self.seed, **common)
        return DataLoader(self._dataset(ids), shuffle=False, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_episode_ids, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # An empty list is Lightning's way of saying "no validation" (val_fraction=0).
        return self._loader(self.val_episode_ids, shuffle=False) if self.val_episode_ids else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()


__all__ = ["SyntheticWindowDataModule", "SyntheticWindows", "SyntheticEpisode", "generate_episodes", "render"]
