"""LightningDataModules of the benchmarks' on-disk formats. Members import on first use.

``RolloutDataModule`` and ``CalvinRolloutDataModule`` live in the rollout layer (:mod:`vitavla.rollout.datamodule`,
:mod:`vitavla.rollout.calvin_datamodule`), above this package; their names here are kept for the class_paths
of existing configs and resolve lazily, so importing ``datamodules`` never loads a rollout module.
"""

from vitavla.lazy import lazy_exports

_EXPORTS = {
    "SyntheticWindowDataModule": "datamodules.synthetic",
    "AlohaDataModule": "datamodules.aloha", "AlohaReader": "datamodules.aloha",
    "LiberoDataModule": "datamodules.libero", "LiberoReader": "datamodules.libero",
    "CalvinDataModule": "datamodules.calvin",
    "LeRobotDataModule": "datamodules.lerobot", "LeRobotReader": "datamodules.lerobot",
    # Old class_paths (configs/quickstart/eval.yaml, saved run configs): resolved on first use only.
    "RolloutDataModule": "vitavla.rollout.datamodule",
    "CalvinRolloutDataModule": "vitavla.rollout.calvin_datamodule",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
