"""The LIBERO demo file the scripted recorder writes: ``<TASK_NAME>_demo.hdf5`` in LIBERO's own layout.

:class:`DemoWriter` appends demos to ``<file>.tmp`` and renames it over the old file only when complete, so an
interrupted run never corrupts an existing file; :func:`existing_demos` reads how far a file got, so a rerun
tops it up, and :func:`recorded_recipe` the generator settings it was recorded with, so a top-up or a reuse with
other settings is refused instead of mixing two kinds of demos in one file. Kept apart from
:mod:`vitavla.demos.libero_scripted` (simulator side and orchestration), which uses both.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vitavla.demos.libero_scripted import Demo


def demo_path(out: str | Path, task_name: str) -> Path:
    """LIBERO's file name for a task's demos."""
    return Path(out) / f"{task_name}_demo.hdf5"


def existing_demos(path: Path) -> tuple[int, int]:
    """(demos kept, next attempt) of an existing output file; (0, 0) when there is none."""
    if not path.exists():
        return 0, 0
    import h5py

    try:
        with h5py.File(path, "r") as h:
            data = h["data"]
            kept = sum(1 for k in data if re.fullmatch(r"demo_\d+", k))
            return kept, int(data.attrs.get("next_attempt", kept))
    except (OSError, KeyError) as e:
        raise ValueError(f"{path}: cannot resume from an unreadable demo file (expected a LIBERO HDF5 with a "
                         f"'data' group): {e}; move it away to start afresh") from e


def recorded_recipe(path: Path) -> dict | None:
    """The generator settings an existing file was recorded with (``data.attrs["recipe"]``); None when there
    is no file or it does not say (a LIBERO release, or a file from before recipes were stored)."""
    if not path.exists():
        return None
    import h5py

    with h5py.File(path, "r") as h:
        raw = h["data"].attrs.get("recipe") if "data" in h else None
    return None if raw is None else json.loads(raw)


class DemoWriter:
    """Appends demos to ``<file>.tmp`` (a copy of any existing file) and renames it into place on close.
    ``recipe``: the generator settings, stored as JSON in ``data.attrs["recipe"]``."""

    def __init__(self, path: Path, problem_info: dict, env_args: dict, bddl_file: str, recipe: dict | None = None):
        import h5py

        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            self.tmp.unlink()  # leftover of an interrupted run; the real file is intact
        if path.exists():
            with h5py.File(path, "r") as src, h5py.File(self.tmp, "w") as dst:
                for k in src:
                    src.copy(src[k], dst, name=k)
                for k, v in src.attrs.items():
                    dst.attrs[k] = v
        self.h = h5py.File(self.tmp, "a")
        data = self.h.require_group("data")
        data.attrs["problem_info"] = json.dumps(problem_info)
        data.attrs["env_args"] = json.dumps(env_args)
        data.attrs["bddl_file_name"] = bddl_file
        data.attrs["generator"] = "vitavla.demos.libero_scripted"
        if recipe is not None:
            data.attrs["recipe"] = json.dumps(recipe, sort_keys=True)
        self.data = data
        self.kept = sum(1 for k in data if re.fullmatch(r"demo_\d+", k))

    def add(self, demo: Demo) -> None:
        a = demo.arrays
        g = self.data.create_group(f"demo_{self.kept}")
        t = len(a["actions"])
        g.attrs["num_samples"] = t
        g.attrs["init_state_index"] = demo.init_state
        g.attrs["attempt"] = demo.attempt
        g.create_dataset("actions", data=a["actions"])
        # What the simulator was given (the labels plus the DART noise): replaying these from the init state
        # reproduces the episode; LIBERO readers ignore the extra key.
        g.create_dataset("executed_actions", data=a["executed_actions"])
        g.create_dataset("states", data=a["states"])
        dones = np.zeros(t, np.uint8)
        dones[-1] = 1
        g.create_dataset("dones", data=dones)
        g.create_dataset("rewards", data=dones.astype(np.float64))
        ee_quat = np.stack([_axisangle2quat(v) for v in a["ee_states"][:, 3:]])
        # LIBERO's robot_states: gripper qpos, eef pos, eef quat.
        g.create_dataset("robot_states", data=np.concatenate([a["gripper_states"], a["ee_states"][:, :3],
                                                              ee_quat], axis=1))
        obs = g.create_group("obs")
        for key in ("agentview_rgb", "eye_in_hand_rgb"):
            # Chunked per frame and gzipped: h5py decompresses transparently on read.
            img = a[key]
            obs.create_dataset(key, data=img, chunks=(1, *img.shape[1:]), compression="gzip",
                               compression_opts=4)
        obs.create_dataset("ee_states", data=a["ee_states"])
        obs.create_dataset("ee_pos", data=a["ee_states"][:, :3])
        obs.create_dataset("ee_ori", data=a["ee_states"][:, 3:])
        obs.create_dataset("gripper_states", data=a["gripper_states"])
        obs.create_dataset("joint_states", data=a["joint_states"])
        self.kept += 1
        self.data.attrs["num_demos"] = self.kept
        self.data.attrs["total"] = int(self.data.attrs.get("total", 0)) + t
        self.h.flush()

    def close(self, next_attempt: int) -> None:
        self.data.attrs["next_attempt"] = next_attempt
        self.h.close()
        if self.kept:
            os.replace(self.tmp, self.path)  # atomic on POSIX: readers see the old or the new file
        else:
            self.tmp.unlink()

    def abort(self) -> None:
        self.h.close()
        self.tmp.unlink(missing_ok=True)


def _axisangle2quat(v: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(v))
    if np.isclose(angle, 0.0):
        return np.array([0.0, 0.0, 0.0, 1.0])
    return np.concatenate([v / angle * np.sin(angle / 2), [np.cos(angle / 2)]])
