"""Lightning modules of the two VITA-VLA stages, and of training a teacher."""

from vitavla.modules.alignment import DistillationModule
from vitavla.modules.common import OptimConfig
from vitavla.modules.exported import ExportedPolicyModule
from vitavla.modules.finetune import PolicyModule
from vitavla.modules.teacher_training import TeacherModule

__all__ = ["DistillationModule", "ExportedPolicyModule", "PolicyModule", "OptimConfig", "TeacherModule"]
