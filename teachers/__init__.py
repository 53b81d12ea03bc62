from teachers.seer import SeerConfig, SeerTeacher  # noqa: F401
from teachers.transformer_teacher import TransformerTeacher  # noqa: F401
