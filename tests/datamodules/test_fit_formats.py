"""`vitavla fit` on every on-disk format: stage 1, then stage 2 from its checkpoint, tiny models."""

from pathlib import Path

import pytest
import torch

from cli import main
from tests.conftest import CONFIGS, FAST, libero_fit_yaml, write_dataset
from tests.datamodules.conftest import write_split


def _calvin(tmp: Path) -> str:
    episodes, segments = [(0, 15)], [(0, 15, "open the drawer")]
    write_split(tmp / "calvin" / "training", episodes, segments)
    write_split(tmp / "calvin" / "validation", episodes, segments, seed=1)
    return f"""data:
  class_path: datamodules.CalvinDataModule
  init_args: {{root: {tmp / 'calvin'}, num_steps: 4, batch_size: 2, num_workers: 0,
              stats_cache_dir: {tmp / 'stats'}}}
"""


def _aloha(tmp: Path) -> str:
    write_dataset(tmp / "aloha", lengths=(9, 10, 11), ids=(0, 1, 2))
    return f"""data:
  class_path: datamodules.AlohaDataModule
  init_args: {{root: {tmp / 'aloha'}, instruction: fold the towel, num_steps: 4, batch_size: 2, num_workers: 0,
              val_fraction: 0.34, stats_cache_dir: {tmp / 'stats'}}}
model:
  init_args:
    student: {{init_args: {{gripper_state: width, gripper_state_dim: 1}}}}
    teacher:
      class_path: teachers.TransformerTeacher
      init_args: {{hidden_size: 32, num_layers: 1, max_steps: 8, gripper_state: width, gripper_state_dim: 1}}
"""


@pytest.mark.parametrize("fmt", ["calvin", "libero", "aloha"])
def test_fit_both_stages(fmt, tmp_path):
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text({"calvin": _calvin, "libero": libero_fit_yaml, "aloha": _aloha}[fmt](tmp_path))
    ckpts = {}
    for stage, config in (("align", "tiny_align.yaml"), ("finetune", "tiny_finetune.yaml")):
        root = tmp_path / stage
        extra = [f"--model.init_args.init_from={ckpts['align']}"] if stage == "finetune" else []
        main(["fit", "--config", str(CONFIGS / config), "--config", str(data_yaml),
              f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}", *FAST, *extra])
        ckpts[stage] = sorted(root.glob("version_*/checkpoints/last.ckpt"))[-1]
    ckpt = torch.load(ckpts["finetune"], map_location="cpu", weights_only=True)
    assert "normalizer" in ckpt and len(ckpt["normalizer"]["arm_low"]) == 6  # inference can un-normalize
