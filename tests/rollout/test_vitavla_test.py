"""`vitavla test` with RolloutDataModule: rollouts in the test loop, resumable, sharded, aggregated."""

import json
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DistributedSampler

from cli import build_cli, main
from tests.rollout.conftest import CONFIGS, ONLY_FINETUNE, QUIET
from vitavla.rollout.datamodule import RolloutDataModule
from vitavla.rollout.env import ScriptedStandInEnv
from vitavla.rollout.runner import EpisodeSpec
from vitavla.rollout.stats import wilson_interval


def vitavla_test(ckpt: Path, root: Path, *extra: str) -> Path:
    out = root / "rollout"
    main(["test", "--config", str(CONFIGS / "eval_tiny.yaml"), "--ckpt_path", str(ckpt),
          f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
          f"--data.init_args.out_dir={out}", "--data.init_args.episodes_per_task=2",
          "--data.init_args.env.init_args.steps=4", *QUIET, *extra])
    return out


def lines(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in out.glob("episodes.rank*.jsonl"))


def test_vitavla_test_runs_rollouts_and_resumes_without_new_episodes(stage2_ckpt, tmp_path):
    out = vitavla_test(stage2_ckpt, tmp_path)
    res = json.loads((out / "results.json").read_text())
    assert res["episodes"] + res["errors"] == 4 and res["errors"] == 0
    assert set(res["per_task"]) == {"0", "1"}
    for t, task in res["per_task"].items():
        assert task["episodes"] == 2 and task["name"].startswith("reach_")
        assert 0.0 <= task["success_rate"] <= 1.0
    assert 0.0 <= res["success_rate"] <= 1.0
    assert res["successes"] == sum(t["successes"] for t in res["per_task"].values())
    assert lines(out) == 4 and len((out / "episodes.jsonl").read_text().splitlines()) == 4
    assert res["success_ci95"] == list(wilson_interval(res["successes"], 4))
    for task in res["per_task"].values():
        assert task["success_ci95"] == list(wilson_interval(task["successes"], 2))
    # Every episode leaves its first and last frame (32 px stand-in frames, side by side), and one sheet shows
    # them all; the recorded episode per task (record_videos_per_task: 1) leaves an mp4 of >= 256 px frames.
    pairs = sorted(p.name for p in (out / "first_last").glob("*.png"))
    assert pairs == ["task00_ep000.png", "task00_ep001.png", "task01_ep000.png", "task01_ep001.png"]
    assert Image.open(out / "first_last" / pairs[0]).size == (64, 32)
    assert Image.open(out / "first_last.png").size[1] > 2 * 128
    videos = sorted((out / "videos").glob("*.mp4"))
    assert [v.name[:12] for v in videos] == ["task00_ep000", "task01_ep000"]
    av = pytest.importorskip("av")
    with av.open(str(videos[0])) as c:
        frame = next(c.decode(video=0))
    assert frame.width == 256 and frame.height > 256  # 8x the 32 px frame, under the banner

    # Same out_dir again: every spec is found finished, nothing runs, the totals are identical.
    first = (out / "episodes.rank0.jsonl").read_text()
    vitavla_test(stage2_ckpt, tmp_path)
    assert (out / "episodes.rank0.jsonl").read_text() == first
    again = json.loads((out / "results.json").read_text())
    keys = ("success_rate", "successes", "episodes", "errors", "per_task")
    assert {k: again[k] for k in keys} == {k: res[k] for k in keys}


def test_reused_out_dir_refuses_another_checkpoint_or_env_and_extends_with_the_same(stage2_ckpt, tmp_path):
    """Issue 16 item 2: a rerun in the same out_dir with another checkpoint used to report the earlier
    checkpoint's finished episodes as its own. Records are bound to checkpoint, policy, env and protocol."""
    import torch

    out = vitavla_test(stage2_ckpt, tmp_path, "--data.init_args.episodes_per_task=1")
    binding = json.loads((out / "binding.json").read_text())
    assert binding["checkpoint"]["path"] == str(stage2_ckpt) and len(binding["checkpoint"]["sha256"]) == 64
    assert binding["env"]["init_args"]["steps"] == 4 and binding["protocol"]["executor"] == "ensemble"
    before = (out / "episodes.rank0.jsonl").read_text()

    other = tmp_path / "other.ckpt"  # the same checkpoint with one weight changed: another policy
    ckpt = torch.load(stage2_ckpt, weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 1.0
    torch.save(ckpt, other)
    for ckpt_path, extra, named in [(other, (), "checkpoint sha256"),
                                    (stage2_ckpt, ("--data.init_args.env.init_args.speed=0.5",),
                                     "env.init_args.speed: now 0.5, recorded 0.25"),
                                    (stage2_ckpt, ("--data.init_args.executor=first",),
                                     "protocol.executor: now 'first', recorded 'ensemble'")]:
        with pytest.raises(SystemExit) as e:
            vitavla_test(ckpt_path, tmp_path, "--data.init_args.episodes_per_task=1", *extra)
        assert str(e.value.code).startswith(
            f"vitavla: error: UserFacingError: {out} holds episodes of another evaluation")
        assert named in str(e.value.code) and "use a new data.init_args.out_dir" in str(e.value.code)
        assert (out / "episodes.rank0.jsonl").read_text() == before  # nothing was run or appended

    # The same evaluation with more episodes per task resumes: the first episodes are kept, the rest run.
    vitavla_test(stage2_ckpt, tmp_path)
    after = (out / "episodes.rank0.jsonl").read_text()
    assert after.startswith(before) and lines(out) == 4

    # Finished records without a binding (written before it existed) cannot be attributed: refused.
    (out / "binding.json").unlink()
    with pytest.raises(SystemExit, match="holds finished episodes .*without binding.json"):
        vitavla_test(stage2_ckpt, tmp_path)


def test_simulator_crashes_are_retried_once_and_never_counted(stage2_ckpt, tmp_path):
    # Every episode crashes: the results are still written, and the run fails instead of exiting 0.
    with pytest.raises(SystemExit) as e:
        vitavla_test(stage2_ckpt, tmp_path, "--data.init_args.env.init_args.crash_at=1",
                     "--data.init_args.episodes_per_task=1")
    out = tmp_path / "rollout"
    assert str(e.value.code) == (f"vitavla: error: UserFacingError: all 2 episodes ended in an error, so nothing "
                                 f"was evaluated; the errors are in {out / 'results.json'} (error_details), and "
                                 f"a rerun retries those episodes")
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == 2 and res["episodes"] == 0 and res["success_rate"] is None
    assert lines(out) == 4  # two attempts per episode, both recorded
    assert len(res["error_details"]) == 2 and "scripted simulator crash" in res["error_details"][0]["error"]


def test_checkpoint_without_normalizer_is_refused_for_raw_action_envs(stage2_ckpt, tmp_path):
    with pytest.raises(ValueError, match="no action normalizer"):
        vitavla_test(stage2_ckpt, tmp_path, "--data.init_args.allow_missing_normalizer=false")


def test_episodes_are_sharded_exactly_once_across_ranks():
    # 9 specs: not divisible by 2, so a padding sampler would repeat one.
    dm = RolloutDataModule(ScriptedStandInEnv(num_task=3), episodes_per_task=3, seed=5)
    seen = []
    for rank in range(2):
        loader = dm.dataloader(num_replicas=2, rank=rank)
        # A DistributedSampler, so Lightning keeps it instead of injecting its padding one.
        assert isinstance(loader.sampler, DistributedSampler)
        batches = list(loader)
        assert all(isinstance(b, list) and len(b) == 1 and isinstance(b[0], EpisodeSpec) for b in batches)
        seen += [b[0] for b in batches]
    assert sorted(seen, key=lambda s: s.key) == dm.specs() and len(set(seen)) == 9
    assert [len(list(dm.dataloader(2, r))) for r in range(2)] == [5, 4]
    assert dm.episodes_per_task == 3 and all(s.seed == 5 for s in seen)


def test_window_batches_still_give_the_offline_test_loss(stage2_ckpt, tmp_path):
    cli = build_cli(["--config", str(CONFIGS / "tiny_finetune.yaml"),
                     f"--trainer.default_root_dir={tmp_path}",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", *QUIET, *ONLY_FINETUNE], run=False)
    out = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(stage2_ckpt), verbose=False)
    assert out[0]["test/loss"] > 0 and "test/success_rate" not in out[0]


def test_parallel_envs_give_the_same_episodes_and_totals_as_one(stage2_ckpt, tmp_path):
    keys = ("success_rate", "successes", "episodes", "errors", "per_task")
    one = vitavla_test(stage2_ckpt, tmp_path / "one")
    two = vitavla_test(stage2_ckpt, tmp_path / "two", "--data.init_args.num_envs=2")
    res1, res2 = (json.loads((o / "results.json").read_text()) for o in (one, two))
    assert {k: res2[k] for k in keys} == {k: res1[k] for k in keys} and res2["episodes"] == 4

    def episodes(out):
        return sorted((r["task"], r["episode"], r["success"], r["steps"], r["error"])
                      for r in map(json.loads, (out / "episodes.jsonl").read_text().splitlines()))

    assert episodes(two) == episodes(one)
    assert sorted(p.name for p in (two / "videos").rglob("*")) == sorted(p.name for p in (one / "videos").rglob("*"))
    # Resume with the pool: nothing left to run, nothing appended, same totals.
    first = (two / "episodes.rank0.jsonl").read_text()
    vitavla_test(stage2_ckpt, tmp_path / "two", "--data.init_args.num_envs=2")
    assert (two / "episodes.rank0.jsonl").read_text() == first


def test_first_episode_offsets_every_task_and_bad_settings_fail_at_config_time():
    dm = RolloutDataModule(ScriptedStandInEnv(num_task=2), episodes_per_task=2, first_episode=3)
    assert [(s.task_index, s.episode_index) for s in dm.specs()] == [(0, 3), (0, 4), (1, 3), (1, 4)]
    with pytest.raises(ValueError, match="first_episode"):
        RolloutDataModule(ScriptedStandInEnv(), first_episode=-1)
    with pytest.raises(ValueError, match="executor must be"):
        RolloutDataModule(ScriptedStandInEnv(), executor="last")


def test_shared_pools_serve_consecutive_test_runs_with_one_set_of_workers(stage2_ckpt, tmp_path, monkeypatch):
    from vitavla.rollout import parallel

    started = []
    real_init = parallel.EnvPool.__init__

    def counting_init(self, *a, **kw):
        started.append(self)
        real_init(self, *a, **kw)

    monkeypatch.setattr(parallel.EnvPool, "__init__", counting_init)
    keys = ("success_rate", "successes", "episodes", "errors", "per_task")
    fresh = vitavla_test(stage2_ckpt, tmp_path / "fresh", "--data.init_args.num_envs=2")
    assert len(started) == 1 and started[0].closed  # without the block every run stops its workers
    with parallel.shared_pools():
        a = vitavla_test(stage2_ckpt, tmp_path / "a", "--data.init_args.num_envs=2")
        pids = [slot.process.pid for slot in started[1]._slots]
        b = vitavla_test(stage2_ckpt, tmp_path / "b", "--data.init_args.num_envs=2")
        assert len(started) == 2 and not started[1].closed
        assert [slot.process.pid for slot in started[1]._slots] == pids  # the same processes ran both
    assert started[1].closed
    want = json.loads((fresh / "results.json").read_text())
    for out in (a, b):  # a reused simulator gives the episodes a fresh one gives
        got = json.loads((out / "results.json").read_text())
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
        assert (out / "episodes.jsonl").read_text().count("\n") == 4
