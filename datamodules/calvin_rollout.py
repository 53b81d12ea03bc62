"""Old home of :class:`~vitavla.rollout.calvin_datamodule.CalvinRolloutDataModule`, kept so that the class_path
``datamodules.calvin_rollout.CalvinRolloutDataModule`` of saved run configs still resolves. The name is looked
up on first use only (PEP 562): importing this module loads nothing of the rollout layer above ``datamodules``.
"""

from vitavla.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"CalvinRolloutDataModule": "vitavla.rollout.calvin_datamodule"})
