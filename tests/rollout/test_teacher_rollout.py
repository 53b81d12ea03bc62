"""`vitavla test` of a trained teacher: TeacherModule runs its teacher closed-loop through the rollout path."""

import json
from pathlib import Path

import torch
import yaml

from cli import build_cli, main
from datamodules.normalization import Normalizer
from vitavla.rollout.env import ScriptedStandInEnv
from vitavla.rollout.executors import TemporalEnsembleExecutor
from vitavla.rollout.runner import EpisodeSpec, evaluate
from vitavla.rollout.teacher_policy import WindowedTeacherPolicy

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
ENV = dict(num_task=2, steps=4, image_size=32, state_dim=7, act_dim=7)


def test_teacher_rollouts_equal_the_plain_runner_with_the_checkpoint_weights(tmp_path, one_thread):
    train = tmp_path / "teacher"
    main(["fit", "--config", str(CONFIGS / "tiny_teacher.yaml"), f"--trainer.default_root_dir={train}",
          f"--trainer.logger.init_args.save_dir={train}", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
          "--trainer.num_sanity_val_steps=0", *QUIET])
    ckpt = next(train.glob("version_*/checkpoints/last.ckpt"))

    # eval_tiny.yaml's data and trainer sections over the teacher's config. Its model section (a PolicyModule)
    # is left out: layered as it is, it would replace the teacher, which the checkpoint check now refuses.
    evalcfg = yaml.safe_load((CONFIGS / "eval_tiny.yaml").read_text())
    del evalcfg["model"]
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evalcfg))
    out = tmp_path / "rollout"
    main(["test", "--config", str(CONFIGS / "tiny_teacher.yaml"), "--config", str(tmp_path / "eval.yaml"),
          "--ckpt_path", str(ckpt), f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.init_args.out_dir={out}",
          "--data.init_args.episodes_per_task=2", "--data.init_args.env.init_args.steps=4",
          "--data.init_args.record_videos_per_task=0", *QUIET])
    res = json.loads((out / "results.json").read_text())
    assert res["episodes"] == 4 and res["errors"] == 0

    # The same episodes through the plain runner, with the teacher rebuilt from the config and the checkpoint.
    cli = build_cli(["--config", str(CONFIGS / "tiny_teacher.yaml"), f"--trainer.default_root_dir={tmp_path}",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", *QUIET], run=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    missing, unexpected = cli.model.load_state_dict(state["state_dict"], strict=False)
    assert not unexpected and all(k.startswith(("teacher.model.vision_encoder", "teacher.text_encoder"))
                                  or "position_embedding" in k for k in missing)
    # The synthetic data is already normalized (no normalizer in the checkpoint; eval_tiny allows that).
    norm = Normalizer.from_state_dict(state["normalizer"]) if "normalizer" in state else None
    policy = WindowedTeacherPolicy(cli.model.teacher.eval())
    specs = [EpisodeSpec(t, e, 0) for t in range(2) for e in range(2)]
    ref = evaluate(lambda: ScriptedStandInEnv(**ENV), policy, specs, TemporalEnsembleExecutor,
                   str(tmp_path / "ref.jsonl"), normalizer=norm,
                   image_size=policy.image_size, progress=False)
    assert res["successes"] == ref["successes"]

    def episodes(lines):
        return sorted((r["task"], r["episode"], r["success"], r["steps"]) for r in map(json.loads, lines))

    assert episodes((out / "episodes.jsonl").read_text().splitlines()) == \
        episodes((tmp_path / "ref.jsonl").read_text().splitlines())
