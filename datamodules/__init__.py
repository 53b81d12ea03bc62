from datamodules.synthetic import SyntheticWindowDataModule  # noqa: F401
from datamodules.aloha import AlohaDataModule, AlohaReader  # noqa: F401
from datamodules.libero import LiberoDataModule, LiberoReader  # noqa: F401
from datamodules.calvin import CalvinDataModule  # noqa: F401
from datamodules.rollout import RolloutDataModule  # noqa: F401
