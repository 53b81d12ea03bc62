"""The one batch structure every datamodule yields and every model consumes.

A :class:`Window` holds ``T`` consecutive control steps of ``B`` episodes. Each step carries two camera views,
the robot state, and a chunk of ``C`` future actions (the label of step ``t`` at chunk index ``j`` is the
action taken at ``t + j``). Shapes are checked once, where data enters a model (:meth:`Window.validate`), so
that a wrong layout fails with a message naming the field instead of a shape error deep inside attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from torch import Tensor


class BatchError(ValueError):
    """A batch whose layout does not match what the model was configured for."""


@dataclass(frozen=True)
class RobotSpec:
    """Dimensions of a robot's state and action, shared by student, teacher and data.

    The state is ``arm_dim`` arm values followed by the gripper part; the action is ``arm_dim`` arm values
    (normalized to [-1, 1]) followed by ``gripper_dim`` gripper targets in [0, 1].
    """

    arm_dim: int = 6
    """Arm degrees of freedom in state and action (6 single-arm, 12 bimanual)."""
    gripper_dim: int = 1
    """Number of gripper action values (1 single-arm, 2 bimanual)."""
    gripper_state: Literal["binary", "width"] = "binary"
    """``binary``: one open/closed value per gripper in the state (>0.5 = open), encoded one-hot;
    ``width``: raw finger positions fed to the state encoder as they are."""
    gripper_state_dim: int | None = None
    """Number of gripper values in the state; default ``gripper_dim`` for binary, ``2 * gripper_dim`` for width."""
    action_chunk: int = 3
    """Future actions predicted per step (the paper uses 3)."""

    def __post_init__(self) -> None:
        if self.arm_dim < 1 or self.gripper_dim < 1 or self.action_chunk < 1:
            raise ValueError(f"RobotSpec dims must be positive, got {self}")
        if self.gripper_state not in ("binary", "width"):
            raise ValueError(f"RobotSpec.gripper_state must be 'binary' or 'width', got {self.gripper_state!r}")

    @property
    def gripper_state_values(self) -> int:
        if self.gripper_state_dim is not None:
            return self.gripper_state_dim
        return self.gripper_dim if self.gripper_state == "binary" else 2 * self.gripper_dim

    @property
    def state_dim(self) -> int:
        return self.arm_dim + self.gripper_state_values

    @property
    def action_dim(self) -> int:
        return self.arm_dim + self.gripper_dim

    @property
    def gripper_features(self) -> int:
        """Width of the gripper part after encoding (one-hot doubles binary values)."""
        return 2 * self.gripper_state_values if self.gripper_state == "binary" else self.gripper_state_values

    def split_state(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """Return (arm, gripper features) of a state tensor (..., state_dim)."""
        arm, grip = state[..., : self.arm_dim], state[..., self.arm_dim :]
        if self.gripper_state == "binary":
            opened = (grip > 0.5).to(state.dtype)
            # Class 0 = closed, class 1 = open, interleaved per gripper: the Seer convention.
            grip = torch.stack([1.0 - opened, opened], dim=-1).flatten(-2)
        return arm, grip

    def check_compatible(self, other: RobotSpec, mine: str, theirs: str) -> None:
        """Fail with a message naming both sides when two components disagree on dimensions."""
        for name in ("arm_dim", "gripper_dim", "action_chunk", "gripper_state", "state_dim"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                raise ValueError(f"{mine}.robot.{name}={a} but {theirs}.robot.{name}={b}; they must match")


@dataclass
class Window:
    """``T`` steps of ``B`` episodes. Images stay uint8 until they reach the model's device.

    Shapes (``V`` = 2 views, view 0 = static / third-person, view 1 = wrist; ``C`` = action chunk):

    - ``images``: uint8 (B, T, V, 3, H, W)
    - ``instruction``: list of B strings
    - ``state``: float (B, T, state_dim), robot units (gripper: see :class:`RobotSpec`)
    - ``actions``: float (B, T, C, action_dim) or None at inference; arm in [-1, 1], gripper in [0, 1]
    - ``valid``: bool (B, T), False for padding steps past an episode's end
    - ``action_valid``: bool (B, T, C) or None, False where ``t + j`` is past the episode's end
    - ``episode_id``: long (B,) and ``frame_index``: long (B, T), for tracing; optional
    """

    images: Tensor
    instruction: list[str]
    state: Tensor
    valid: Tensor
    actions: Tensor | None = None
    action_valid: Tensor | None = None
    episode_id: Tensor | None = None
    frame_index: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Format-specific tensors with a leading batch axis (for example future frames for a teacher's own loss)."""

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    @property
    def num_steps(self) -> int:
        return self.images.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Window:
        def move(x):
            return x.to(device, non_blocking=non_blocking) if isinstance(x, Tensor) else x

        out = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "extras"}
        return Window(**out, extras={k: move(v) for k, v in self.extras.items()})

    def slice_steps(self, start: int, stop: int) -> Window:
        """The steps ``start:stop`` of every episode (views, not copies)."""

        def cut(x):
            return x[:, start:stop] if isinstance(x, Tensor) and x.dim() >= 2 else x

        return replace(
            self,
            images=cut(self.images),
            state=cut(self.state),
            valid=cut(self.valid),
            actions=cut(self.actions),
            action_valid=cut(self.action_valid),
            frame_index=cut(self.frame_index),
        )

    def validate(self, robot: RobotSpec, *, num_views: int = 2, image_size: int | None = None,
                 require_actions: bool = False, max_steps: int | None = None) -> Window:
        """Check every field against ``robot``; raise :class:`BatchError` naming the field otherwise."""
        img = self.images
        if not isinstance(img, Tensor) or img.dim() != 6:
            raise BatchError(f"Window.images must be a (B, T, V, 3, H, W) tensor, got "
                             f"{type(img).__name__} {tuple(getattr(img, 'shape', ()))}")
        if img.dtype != torch.uint8:
            raise BatchError(f"Window.images must be uint8 (normalization happens on the model's device), "
                             f"got {img.dtype}")
        b, t, v, c, h, w = img.shape
        if v != num_views or c != 3:
            raise BatchError(f"Window.images has {v} views x {c} channels, expected {num_views} views x 3")
        if image_size is not None and (h, w) != (image_size, image_size):
            raise BatchError(f"Window.images are {h}x{w}, but the model expects {image_size}x{image_size}")
        if max_steps is not None and t > max_steps:
            raise BatchError(f"Window has {t} steps but the model takes at most {max_steps}")
        if len(self.instruction) != b:
            raise BatchError(f"Window.instruction has {len(self.instruction)} strings for a batch of {b}")
        _expect(self.state, "state", (b, t, robot.state_dim), floating=True)
        _expect(self.valid, "valid", (b, t), dtype=torch.bool)
        if self.actions is None:
            if require_actions:
                raise BatchError("Window.actions is None but this stage trains on actions")
        else:
            _expect(self.actions, "actions", (b, t, robot.action_chunk, robot.action_dim), floating=True)
            if self.action_valid is None:
                raise BatchError("Window.actions is set but Window.action_valid is None")
            _expect(self.action_valid, "action_valid", (b, t, robot.action_chunk), dtype=torch.bool)
        return self


def _expect(x, name: str, shape: tuple[int, ...], *, floating: bool = False, dtype=None) -> None:
    if not isinstance(x, Tensor):
        raise BatchError(f"Window.{name} must be a tensor of shape {shape}, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise BatchError(f"Window.{name} has shape {tuple(x.shape)}, expected {shape}")
    if floating and not x.is_floating_point():
        raise BatchError(f"Window.{name} must be floating point, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise BatchError(f"Window.{name} must be {dtype}, got {x.dtype}")


def collate_windows(samples: list[dict]) -> Window:
    """Stack per-window dicts (the fields of :class:`Window` without the batch axis) into a Window."""
    if not samples:
        raise BatchError("cannot collate an empty list of windows")

    def stack(key):
        vals = [s.get(key) for s in samples]
        if all(v is None for v in vals):
            return None
        return torch.stack([torch.as_tensor(v) for v in vals])

    extras_keys = set().union(*(s.get("extras", {}).keys() for s in samples))
    return Window(
        images=stack("images"),
        instruction=[s["instruction"] for s in samples],
        state=stack("state"),
        valid=stack("valid"),
        actions=stack("actions"),
        action_valid=stack("action_valid"),
        episode_id=stack("episode_id"),
        frame_index=stack("frame_index"),
        extras={k: torch.stack([torch.as_tensor(s["extras"][k]) for s in samples]) for k in extras_keys},
    )


def fake_window(robot: RobotSpec, batch_size: int = 2, num_steps: int = 4, image_size: int = 224,
                instructions: tuple[str, ...] = ("pick up the red block", "open the drawer"),
                generator: torch.Generator | None = None) -> Window:
    """A random but well-formed window, for smoke tests and benchmarks."""
    g = generator or torch.Generator().manual_seed(0)
    b, t, c = batch_size, num_steps, robot.action_chunk
    state = torch.randn(b, t, robot.state_dim, generator=g)
    if robot.gripper_state == "binary":
        state[..., robot.arm_dim:] = (torch.rand(b, t, robot.gripper_state_values, generator=g) > 0.5).float()
    arm = torch.rand(b, t, c, robot.arm_dim, generator=g) * 2 - 1
    grip = (torch.rand(b, t, c, robot.gripper_dim, generator=g) > 0.5).float()
    return Window(
        images=torch.randint(0, 256, (b, t, 2, 3, image_size, image_size), dtype=torch.uint8, generator=g),
        instruction=[instructions[i % len(instructions)] for i in range(b)],
        state=state,
        valid=torch.ones(b, t, dtype=torch.bool),
        actions=torch.cat([arm, grip], dim=-1),
        action_valid=torch.ones(b, t, c, dtype=torch.bool),
    )
