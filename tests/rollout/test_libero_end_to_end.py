"""`vitavla fit` on LIBERO-format demos, then `vitavla test` in the LIBERO simulator: JSON, plot, video."""

import json
from pathlib import Path

import pytest

from cli import main
from tests.conftest import FAST, libero_fit_yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.sim
def test_fit_then_vitavla_test_inlibero_fit_yaml(tmp_path):
    pytest.importorskip("libero.libero")
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(libero_fit_yaml(tmp_path))
    fit_root = tmp_path / "fit"
    main(["fit", "--config", str(CONFIGS / "tiny_finetune.yaml"), "--config", str(data_yaml),
          "--model.init_args.init_mode=only_finetune", "--model.init_args.init_from=null",
          f"--trainer.default_root_dir={fit_root}", f"--trainer.logger.init_args.save_dir={fit_root}", *FAST])
    ckpt = next(fit_root.glob("version_*/checkpoints/last.ckpt"))

    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(f"""model:
  init_args:
    student: {{init_args: {{gripper_state: width, gripper_state_dim: 2}}}}
    teacher: {{init_args: {{overrides: {{gripper_width: true}}}}}}
data:
  init_args:
    env:
      class_path: vitavla.rollout.libero_env.LiberoEnv
      init_args: {{suite: libero_10, protocol: seer, max_steps: 3, settle_steps: 1}}
    tasks: [0]
    episodes_per_task: 1
    executor: ensemble
    allow_missing_normalizer: false
    out_dir: {tmp_path / 'rollout'}
""")
    main(["test", "--config", str(CONFIGS / "eval_tiny.yaml"), "--config", str(eval_yaml), "--ckpt_path", str(ckpt),
          f"--trainer.default_root_dir={tmp_path / 'eval'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'eval'}",
          "--trainer.enable_progress_bar=false"])
    out = tmp_path / "rollout"
    res = json.loads((out / "results.json").read_text())
    assert res["episodes"] + res["errors"] == 1 and res["errors"] == 0
    assert res["per_task"]["0"]["episodes"] == 1
    assert (out / "success_per_task.png").is_file()
    assert res["success_ci95"] is not None and len(res["success_ci95"]) == 2
    videos = list(out.rglob("*.mp4"))
    assert videos, "no rollout video written"
    av = pytest.importorskip("av")
    with av.open(str(videos[0])) as c:
        frame = next(c.decode(video=0))
    assert frame.width == 256 and frame.height > 256  # the 128 px render enlarged 2x, under the banner
    assert (out / "first_last.png").is_file() and (out / "first_last" / "task00_ep000.png").is_file()
