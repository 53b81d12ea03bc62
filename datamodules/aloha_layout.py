"""ALOHA's qpos/action column layout, shared by the dataset reader and the simulator adapter.

Kept in a module of its own (no Lightning, no h5py) because simulator worker processes import the adapter.
"""

# qpos width -> arms -> columns, reordered to (arm joints..., grippers...) as RobotSpec expects
ARM_COLUMNS = {
    14: {"left": list(range(7)), "right": list(range(7, 14)), "both": [*range(6), *range(7, 13), 6, 13]},
    7: {"left": list(range(7))},
}
