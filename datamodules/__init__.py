from datamodules.synthetic import SyntheticWindowDataModule  # noqa: F401
