"""Lightning modules of the two VITA-VLA stages."""

from vitavla.modules.alignment import DistillationModule
from vitavla.modules.common import OptimConfig
from vitavla.modules.finetune import PolicyModule

__all__ = ["DistillationModule", "PolicyModule", "OptimConfig"]
