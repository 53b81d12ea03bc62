"""LightningDataModules of the benchmarks' on-disk formats, and of rollouts. Members import on first use."""

from vitavla.lazy import lazy_exports

_EXPORTS = {
    "SyntheticWindowDataModule": "datamodules.synthetic",
    "AlohaDataModule": "datamodules.aloha", "AlohaReader": "datamodules.aloha",
    "LiberoDataModule": "datamodules.libero", "LiberoReader": "datamodules.libero",
    "CalvinDataModule": "datamodules.calvin",
    "LeRobotDataModule": "datamodules.lerobot", "LeRobotReader": "datamodules.lerobot",
    "RolloutDataModule": "datamodules.rollout",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
