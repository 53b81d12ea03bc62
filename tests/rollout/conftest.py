"""Fixtures of the rollout tests: a fake CALVIN install, and a stage-2 checkpoint for ``vitavla test`` runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import main
from tests.rollout.fake_calvin import build_fake, forget, install_fake

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# Small model-side config shared by the fit and the Window-batch test (no stage-1 checkpoint needed).
ONLY_FINETUNE = ["--model.init_args.init_mode=only_finetune", "--model.init_args.init_from=null",
                 "--data.init_args.num_episodes=4", "--data.init_args.episode_length=6"]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake calvin_env / calvin_agent tree (tests/rollout/fake_calvin.py) built and importable."""
    paths = build_fake(tmp_path)
    install_fake(monkeypatch, paths)
    yield paths
    forget()


@pytest.fixture(scope="session")
def stage2_ckpt(tmp_path_factory) -> Path:
    """One step of tiny_finetune: a checkpoint every ``vitavla test`` of the rollout tests evaluates (read
    only, so one fit serves them all)."""
    root = tmp_path_factory.mktemp("finetune")
    main(["fit", "--config", str(CONFIGS / "tiny_finetune.yaml"), f"--trainer.default_root_dir={root}",
          f"--trainer.logger.init_args.save_dir={root}", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", *QUIET, *ONLY_FINETUNE])
    return next(root.glob("version_*/checkpoints/last.ckpt"))
