"""Benchmark layouts: which recorded columns make the state and the action, and what gripper target 1 means.

The dataset readers (:mod:`datamodules`) and the simulator adapters (:mod:`vitavla.rollout`) must agree on
these to the column, or a policy sees at evaluation a state it was never trained on. Both import them from
here. The module needs numpy and nothing else (no Lightning, no h5py): simulator worker processes import the
adapters, and each heavy import would cost seconds per worker start.
"""

from __future__ import annotations

import numpy as np

from vitavla.batch import RobotSpec

# CALVIN (Mees et al., 2022): robot_obs is 15 values, tcp pos (3), tcp euler (3), gripper width (1), arm
# joints (7), previous gripper action (1, -1 closed / +1 open); rel_actions are 6 values in [-1, 1] and the
# gripper command (-1 close / +1 open).
CALVIN_ROBOT = RobotSpec(arm_dim=6, gripper_dim=1, gripper_state="binary")
CALVIN_GRIPPER_CONVENTION = "1 = open (CALVIN +1 open / -1 close)"


def calvin_state(robot_obs: np.ndarray) -> np.ndarray:
    """(n, 15) robot_obs -> (n, 7) state: TCP pose + gripper (-1 closed / +1 open -> 0 / 1), as Seer does."""
    return np.concatenate([robot_obs[:, :6], (robot_obs[:, 14:15] + 1) / 2], axis=1).astype(np.float32)


# LIBERO: the state's gripper part is either the two finger joint positions ("width") or the previous gripper
# command as 0/1 ("binary"); the recorded gripper action is -1 open / +1 close.
LIBERO_GRIPPER_STATES = ("width", "binary")
LIBERO_GRIPPER_ACTIONS = {
    # name -> (raw value mapped to target 0, raw value mapped to target 1, convention string in checkpoints)
    "close_positive": (-1.0, 1.0, "1 = close (LIBERO -1 open / +1 close)"),
    "open_positive": (1.0, -1.0, "1 = open (LIBERO -1 open / +1 close, flipped)"),
}

# ALOHA / PiPer: qpos width -> arms -> columns, reordered to (arm joints..., grippers...) as RobotSpec expects
ALOHA_ARM_COLUMNS = {
    14: {"left": list(range(7)), "right": list(range(7, 14)), "both": [*range(6), *range(7, 13), 6, 13]},
    7: {"left": list(range(7))},
}
ALOHA_GRIPPER_CONVENTION = "1 = open (opening width, min→0, max→1)"
