"""What the scripted expert needs from a LIBERO scene: the pick-and-place goal parsed from the task's BDDL,
and the gripper, object and target poses read from the MuJoCo state every step (:class:`LiberoPoses`).

Kept apart from the recorder (:mod:`vitavla.demos.libero_scripted`) because it is the one place that knows
LIBERO's object naming and geometry; the expert itself (:mod:`vitavla.demos.pick_place_expert`) sees only
:class:`~vitavla.demos.pick_place_expert.ScenePoses`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitavla.demos.pick_place_expert import TALL_OBJECT, ScenePoses

GOAL_PREDICATES = ("in", "on")


def parse_pick_place_goal(goal_state: Sequence[Sequence[str]], task: str) -> tuple[str, str]:
    """``(object, target)`` names from a LIBERO ``parsed_problem["goal_state"]``.

    Accepts a single ``["in", obj, "<target>_contain_region"]`` or ``["on", obj, target]`` (a region suffix
    of the target object is stripped); anything else is not a single pick-and-place and raises.
    """
    goals = [list(g) for g in goal_state]
    if len(goals) != 1 or len(goals[0]) != 3 or str(goals[0][0]).lower() not in GOAL_PREDICATES:
        raise ValueError(f"task {task!r}: the scripted expert handles one (In obj target) or (On obj target) "
                         f"goal, got {goals}")
    _, obj, target = goals[0]
    return obj, target


def _resolve_body(names: Sequence[str], region: str, task: str) -> str:
    """The object whose region ``region`` is (``basket_1_contain_region`` -> ``basket_1``)."""
    if region in names:
        return region
    owners = [n for n in names if region.startswith(n + "_")]
    if not owners:
        raise ValueError(f"task {task!r}: goal target {region!r} is neither an object nor a region of one "
                         f"(objects: {sorted(names)})")
    return max(owners, key=len)


class LiberoPoses:
    """Reads :class:`ScenePoses` for one pick-and-place task from a LIBERO env's MuJoCo state."""

    def __init__(self, env, task: str):
        self._env = env.env if hasattr(env, "env") and hasattr(env.env, "parsed_problem") else env
        e = self._env
        obj, target = parse_pick_place_goal(e.parsed_problem["goal_state"], task)
        names = list(e.obj_body_id)
        self.object_name = _resolve_body(names, obj, task)
        self.target_name = _resolve_body(names, target, task)

    def _extent(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """World-frame axis-aligned box (low, high) of every geom under an object's root body."""
        model, data = self._env.sim.model._model, self._env.sim.data._data
        root = self._env.obj_body_id[name]
        geoms = np.flatnonzero(model.body_rootid[model.geom_bodyid] == root)
        if geoms.size == 0:
            raise ValueError(f"object {name!r} has no geoms")
        aabb = model.geom_aabb[geoms]  # (n, 6): centre and half sizes in each geom's frame
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
        corners = aabb[:, None, :3] + signs[None] * aabb[:, None, 3:]  # (n, 8, 3)
        rot = data.geom_xmat[geoms].reshape(-1, 3, 3)
        world = np.einsum("nij,nkj->nki", rot, corners) + data.geom_xpos[geoms][:, None]
        world = world.reshape(-1, 3)
        return world.min(0), world.max(0)

    def read(self) -> ScenePoses:
        e = self._env
        eef_pos = np.array(e.sim.data.site_xpos[e.robots[0].eef_site_id])
        eef_quat = _mat2quat(np.array(e.sim.data.site_xmat[e.robots[0].eef_site_id]).reshape(3, 3))
        olo, ohi = self._extent(self.object_name)
        tlo, thi = self._extent(self.target_name)
        height = ohi[2] - olo[2]
        # Short objects are grasped halfway up; tall ones (bottles) 3 cm below the top, because open fingers
        # cannot slide down past a bottle's shoulder. Never so low that the fingertips scrape the floor.
        grasp_z = ohi[2] - 0.03 if height > TALL_OBJECT else olo[2] + height / 2
        grasp_z = max(grasp_z, olo[2] + 0.012)
        centre = (olo + ohi) / 2
        return ScenePoses(eef_pos=eef_pos, eef_quat=eef_quat,
                          object_grasp=np.array([centre[0], centre[1], grasp_z]), object_bottom=float(olo[2]),
                          target_center=(tlo + thi) / 2, target_top=float(thi[2]))


def _mat2quat(m: np.ndarray) -> np.ndarray:
    """Rotation matrix -> (x, y, z, w) quaternion."""
    import mujoco

    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, m.reshape(-1))  # (w, x, y, z)
    return np.array([q[1], q[2], q[3], q[0]])
