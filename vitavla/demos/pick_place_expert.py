"""A simulator-free scripted pick-and-place expert: poses in, LIBERO OSC delta-pose actions out.

:class:`PickPlaceExpert` runs the phases above-object, descend, close, lift, above-target, lower, open and
retreat on the :class:`ScenePoses` a simulator adapter reads each step (see
:class:`vitavla.demos.libero_poses.LiberoPoses`). Kept apart from the recorder so its logic is tested
without MuJoCo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from vitavla.rollout.libero_env import quat2axisangle

OSC_POS_LIMIT = 0.05
"""Metres per step of a full-scale position action in LIBERO's OSC_POSE controller (``output_max``)."""
OSC_ROT_LIMIT = 0.5
"""Radians per step of a full-scale rotation action (``output_max``)."""
OPEN, CLOSE = -1.0, 1.0  # LIBERO gripper commands
TALL_OBJECT = 0.10
"""Objects taller than this (metres) are grasped near the top instead of halfway up."""


class Phase(IntEnum):
    ABOVE_OBJECT = 0
    DESCEND = 1
    CLOSE = 2
    LIFT = 3
    ABOVE_TARGET = 4
    LOWER = 5
    OPEN = 6
    RETREAT = 7
    DONE = 8


@dataclass
class ScenePoses:
    """What the expert needs from the scene at one step (world frame, metres; quaternion x, y, z, w).

    ``object_grasp`` is the point between the fingers at which to grasp; ``object_bottom`` the lowest point
    of the object (it hangs below the gripper once lifted); ``target_center`` the x, y (z ignored) to drop
    over; ``target_top`` the height of the target's rim or surface.
    """

    eef_pos: np.ndarray
    eef_quat: np.ndarray
    object_grasp: np.ndarray
    object_bottom: float
    target_center: np.ndarray
    target_top: float


@dataclass
class ExpertConfig:
    """Waypoint geometry, gains and timing of :class:`PickPlaceExpert`. Distances in metres."""

    approach_height: float = 0.08
    """Height above the grasp point at which the gripper lines up before descending."""
    funnel_radius: float = 0.0
    """0: line up above the object, then descend (two phases). > 0 (metres): one approach whose height goal
    falls with the horizontal error, from ``approach_height`` at this distance or more to the grasp point at
    zero, so the gripper only gets low once it is lined up. Its command is then a smooth function of the pose
    alone, with no hidden phase to infer: a policy that drifts sideways near the object sees demos that rise
    and correct, instead of demos that had already started descending."""
    carry_clearance: float = 0.07
    """Gap kept between the carried object's bottom and the target's top while moving over it."""
    release_clearance: float = 0.025
    """Gap between the object's bottom and the target's top when the gripper opens."""
    xy_tolerance: float = 0.008
    """Horizontal error below which a waypoint counts as reached; the gripper closes only within it."""
    z_tolerance: float = 0.01
    """Vertical error below which a waypoint counts as reached."""
    gain: float = 1.0
    """Proportional gain: action = gain * error / (the controller's metres per full-scale step)."""
    descend_xy_gain: float = 1.0
    """Extra factor on the horizontal gain while descending onto the object. At 1 a 5 mm sideways error
    commands 0.1 of full scale, a label a policy hardly tells from 0; > 1 makes the labels near the object
    correct a sideways error decisively. Tried for libero_object's cream cheese (a flat box with under 2 cm
    to spare), with ``xy_tolerance`` 4 mm: a teacher went from 0 to 1 of 15 held-out episodes, because its
    misses happen before the descent (docs/quickstart.md)."""
    max_speed: float = 1.0
    """Largest position action while moving freely (actions are clipped to [-1, 1] anyway)."""
    slow_speed: float = 0.5
    """Largest position action close to objects (descend, lower), so nothing gets knocked over."""
    rot_gain: float = 1.0
    """Gain holding the initial gripper orientation (the OSC drifts in orientation otherwise)."""
    gripper_steps: int = 10
    """Steps spent closing or opening the gripper in place (the fingers need ~8 steps at 20 Hz)."""
    retreat_steps: int = 10
    """Steps moving up after release before the expert reports DONE."""
    phase_timeout: int = 80
    """Steps after which a waypoint phase gives up (the episode then fails and is discarded)."""
    noise: float = 0.0
    """Std of Gaussian noise added to the position actions (action units); 0 = deterministic."""
    waypoint_noise: float = 0.0
    """Std (metres) of a per-episode random offset of the approach height and drop point."""


@dataclass
class PickPlaceExpert:
    """A phase machine that picks an object and places it in/on a target, from poses read every step.

    Call :meth:`act` once per step with the current :class:`ScenePoses`; it returns a 7-D LIBERO action
    (3 position deltas, 3 axis-angle deltas, gripper -1 open / +1 close), clipped to [-1, 1], with the
    configured noise; :attr:`clean_action` then holds the same action without noise. ``failed`` is
    set when a phase times out; ``phase`` is :attr:`Phase.DONE` after the retreat.
    """

    config: ExpertConfig = field(default_factory=ExpertConfig)
    rng: np.random.Generator | None = None
    phase: Phase = Phase.ABOVE_OBJECT
    failed: bool = False

    def __post_init__(self) -> None:
        self._t_phase = 0
        self._ref_quat: np.ndarray | None = None
        self._hold: np.ndarray | None = None  # position held while the gripper closes / opens
        self._carry_z: float | None = None
        self._release_z: float | None = None
        rng, c = self.rng, self.config
        if rng is not None and c.waypoint_noise > 0:
            self._approach_dz = float(rng.normal(0.0, c.waypoint_noise))
            self._drop_dxy = rng.normal(0.0, c.waypoint_noise, 2)
        else:
            self._approach_dz, self._drop_dxy = 0.0, np.zeros(2)

    # -- public ----------------------------------------------------------------------------------------
    def act(self, p: ScenePoses) -> np.ndarray:
        """The action for this step; advances the phase first when its waypoint is reached."""
        c = self.config
        if self._ref_quat is None:
            self._ref_quat = np.asarray(p.eef_quat, dtype=np.float64).copy()
        eef = np.asarray(p.eef_pos, dtype=np.float64)
        goal, speed, grip = self._goal(p, eef)
        # The funnel's moving height goal is not its end: it is reached at the grasp point itself.
        funnel = self.phase == Phase.ABOVE_OBJECT and c.funnel_radius > 0
        end = np.asarray(p.object_grasp, dtype=np.float64) if funnel else goal
        if self._reached(eef, end) and self._advance(p, eef):
            goal, speed, grip = self._goal(p, eef)
        self._t_phase += 1
        if self.phase not in (Phase.CLOSE, Phase.OPEN, Phase.DONE) and self._t_phase > c.phase_timeout:
            self.failed = True
        action = np.zeros(7)
        if self.phase != Phase.DONE:
            gain = c.gain
            if self.phase == Phase.DESCEND and c.descend_xy_gain != 1.0:
                gain = c.gain * np.array([c.descend_xy_gain, c.descend_xy_gain, 1.0])
            action[:6] = reach_action(eef, goal, self._ref_quat, p.eef_quat, speed, gain, c.rot_gain)
        action[6] = grip
        # The expert's own command for this state: the label a DART-style recorder stores while it executes
        # the noisy one, so demos visit states off the clean path and teach the way back from them.
        self.clean_action = np.clip(action, -1.0, 1.0)
        if self.phase != Phase.DONE and c.noise > 0 and self.rng is not None:
            action[:3] += self.rng.normal(0.0, c.noise, 3)
        return np.clip(action, -1.0, 1.0)

    # -- internals -------------------------------------------------------------------------------------
    def _goal(self, p: ScenePoses, eef: np.ndarray) -> tuple[np.ndarray, float, float]:
        """(goal position, speed limit, gripper command) of the current phase."""
        c, ph = self.config, self.phase
        grasp = np.asarray(p.object_grasp, dtype=np.float64)
        if ph == Phase.ABOVE_OBJECT:
            height = c.approach_height + self._approach_dz
            if c.funnel_radius <= 0:
                return grasp + [0.0, 0.0, height], c.max_speed, OPEN
            off = float(np.linalg.norm(grasp[:2] - eef[:2]))
            near = off < c.funnel_radius
            return (grasp + [0.0, 0.0, height * min(1.0, off / c.funnel_radius)],
                    c.slow_speed if near else c.max_speed, OPEN)
        if ph == Phase.DESCEND:
            return grasp, c.slow_speed, OPEN
        if ph in (Phase.CLOSE, Phase.OPEN):
            return self._hold, c.slow_speed, CLOSE if ph == Phase.CLOSE else OPEN
        drop = np.array([p.target_center[0] + self._drop_dxy[0], p.target_center[1] + self._drop_dxy[1]])
        if ph == Phase.LIFT:
            return np.array([self._hold[0], self._hold[1], self._carry_z]), c.max_speed, CLOSE
        if ph == Phase.ABOVE_TARGET:
            return np.array([drop[0], drop[1], self._carry_z]), c.max_speed, CLOSE
        if ph == Phase.LOWER:
            return np.array([drop[0], drop[1], self._release_z]), c.slow_speed, CLOSE
        if ph == Phase.RETREAT:
            return np.array([self._hold[0], self._hold[1], self._carry_z]), c.max_speed, OPEN
        return eef, 0.0, OPEN  # DONE: stay put, open

    def _reached(self, eef: np.ndarray, goal: np.ndarray) -> bool:
        c = self.config
        if self.phase in (Phase.CLOSE, Phase.OPEN):
            return self._t_phase >= c.gripper_steps
        if self.phase == Phase.RETREAT:
            return self._t_phase >= c.retreat_steps
        if self.phase == Phase.DONE:
            return False
        return bool(np.linalg.norm(goal[:2] - eef[:2]) < c.xy_tolerance
                    and abs(goal[2] - eef[2]) < c.z_tolerance)

    def _advance(self, p: ScenePoses, eef: np.ndarray) -> bool:
        """Enter the next phase, fixing the heights it needs from the scene as it is now."""
        c = self.config
        nxt = Phase(self.phase + 1)
        if nxt == Phase.DESCEND and c.funnel_radius > 0:
            nxt = Phase.CLOSE  # the funnel ends at the grasp point: nothing left to descend
        if nxt in (Phase.CLOSE, Phase.OPEN, Phase.RETREAT):
            self._hold = eef.copy()
        if nxt == Phase.LIFT:
            # The object hangs (eef - bottom) below the gripper; carry it clear of the target's rim.
            hang = eef[2] - p.object_bottom
            self._carry_z = max(p.target_top + c.carry_clearance + hang, eef[2] + c.approach_height)
            self._release_z = p.target_top + c.release_clearance + hang
        self.phase, self._t_phase = nxt, 0
        return True


def reach_action(eef: np.ndarray, goal: np.ndarray, ref_quat: np.ndarray, quat: np.ndarray,
                 speed: float = 1.0, gain: float | np.ndarray = 1.0, rot_gain: float = 1.0) -> np.ndarray:
    """The 6 arm values of an OSC_POSE action moving ``eef`` toward ``goal`` while holding ``ref_quat``:
    proportional in position and in rotation (``gain``: one number, or one per axis).

    A position command larger than ``speed`` on some axis is scaled down as a whole, not clipped per axis, so
    the gripper moves in a straight line to the goal: every axis's error shrinks over the whole approach.
    (Per-axis clipping fixes the small axes in the first few steps and then moves only the large ones; a
    policy trained on that never sees a late error on a small axis corrected.)"""
    out = np.empty(6)
    pos = gain * (np.asarray(goal, dtype=np.float64) - eef) / OSC_POS_LIMIT
    largest = np.abs(pos).max()
    out[:3] = pos * (speed / largest) if largest > speed else pos
    out[3:] = rot_gain * _rotation_error(ref_quat, quat) / OSC_ROT_LIMIT
    return out


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (x, y, z, w) quaternions."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by, aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw, aw * bw - ax * bx - ay * by - az * bz])


def _rotation_error(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """World-frame axis-angle taking ``cur`` to ``ref``: the OSC applies rotation deltas on the left."""
    cur = np.asarray(cur, dtype=np.float64)
    err = _quat_mul(np.asarray(ref, dtype=np.float64), cur * [-1.0, -1.0, -1.0, 1.0])
    if err[3] < 0:  # the short way round
        err = -err
    return quat2axisangle(err / np.linalg.norm(err))
