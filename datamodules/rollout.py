"""Old home of :class:`~vitavla.rollout.datamodule.RolloutDataModule`, kept so that the class_path
``datamodules.rollout.RolloutDataModule`` of saved run configs still resolves. The name is looked up on first
use only (PEP 562): importing this module loads nothing of the rollout layer, which sits above ``datamodules``.
"""

from vitavla.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"RolloutDataModule": "vitavla.rollout.datamodule",
                                               "ExecutorName": "vitavla.rollout.datamodule"})
