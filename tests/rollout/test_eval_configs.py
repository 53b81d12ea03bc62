"""configs/eval_calvin.yaml and configs/eval_aloha.yaml without the simulators: they parse, their model sections
match the training side (eval_aloha against the other ALOHA configs in tests/test_aloha_configs.py), the
CALVIN data section instantiates over a fake calvin_env, and `vitavla test` runs CALVIN chains through
CalvinRolloutTestCallback (resume and crash handling included)."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from cli import build_cli, main
from datamodules.calvin import ROBOT as CALVIN_ROBOT
from teachers import SeerConfig
from teachers.seer.teacher import robot_spec
from tests.rollout.conftest import QUIET
from tests.rollout.fake_calvin import build_fake, forget, install_fake, real_calvin_agent
from vitavla.batch import RobotSpec
from vitavla.rollout.aloha_env import TO_MODEL
from vitavla.rollout.calvin_datamodule import CalvinRolloutDataModule
from vitavla.rollout.calvin_env import CalvinSimEnv
from vitavla.rollout.executors import FirstActionExecutor

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def load(name):
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize("name", ["eval_calvin", "eval_aloha"])
def test_eval_configs_parse(name):
    with pytest.raises(SystemExit) as e:
        build_cli(["test", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"], run=True)
    assert e.value.code in (0, None)


def test_eval_calvin_model_matches_finetune_calvin():
    ev, ft = load("eval_calvin.yaml")["model"]["init_args"], load("finetune_calvin.yaml")["model"]["init_args"]
    assert ev["student"] == ft["student"] and ev["teacher"] == ft["teacher"]
    assert ev["init_mode"] == "only_finetune" and ev["init_from"] is None
    s = ev["student"]["init_args"]
    assert RobotSpec(s["arm_dim"], s["gripper_dim"], s["gripper_state"]) == CALVIN_ROBOT


def test_eval_aloha_model_is_a_bimanual_student_for_the_sim_adapter():
    cfg = load("eval_aloha.yaml")
    s, t = (cfg["model"]["init_args"][k]["init_args"] for k in ("student", "teacher"))
    # AlohaDataModule(arms="both") trains with this robot; AlohaSimEnv returns and takes 12 + 2 values.
    both = RobotSpec(arm_dim=12, gripper_dim=2, gripper_state="width", gripper_state_dim=2)
    assert RobotSpec(s["arm_dim"], s["gripper_dim"], s["gripper_state"], s["gripper_state_dim"]) == both
    # The teacher is the bimanual Seer of teacher_aloha.yaml: its robot comes from the SeerConfig overrides
    # on its preset (the config alone: building the released preset needs the MAE and CLIP files).
    assert cfg["model"]["init_args"]["teacher"]["class_path"] == "teachers.SeerTeacher"
    seer = SeerConfig.preset(t["preset"], **t["overrides"])
    assert robot_spec(seer) == both
    assert s["max_steps"] == seer.sequence_length  # the student's history is the teacher's S (7)
    assert len(TO_MODEL) == both.arm_dim + both.gripper_dim
    env = cfg["data"]["init_args"]["env"]
    assert env["class_path"] == "vitavla.rollout.aloha_env.AlohaSimEnv" and env["init_args"]["task"] == "transfer_cube"


def test_eval_calvin_data_section_instantiates_over_a_fake_calvin_env(tmp_path, monkeypatch):
    paths = build_fake(tmp_path)
    install_fake(monkeypatch, paths)
    try:
        data = load("eval_calvin.yaml")["data"]
        assert data["class_path"] == "vitavla.rollout.calvin_datamodule.CalvinRolloutDataModule"
        env_cfg = data["init_args"].pop("env")
        assert env_cfg["class_path"] == "vitavla.rollout.calvin_env.CalvinSimEnv"
        env = CalvinSimEnv(**{**env_cfg["init_args"], "dataset_path": str(paths["dataset"])})
        dm = CalvinRolloutDataModule(env, **{**data["init_args"], "num_chains": 5})
        assert len(dm.chains) == 5 and dm.ep_len == 360 and dm.retries == 1
        assert [s.episode_index for s in dm.specs()] == [0, 1, 2, 3, 4] and {s.task_index for s in dm.specs()} == {0}
        assert isinstance(dm.make_executor(), FirstActionExecutor) and dm.robot == CALVIN_ROBOT
    finally:
        forget()


def calvin_test(ckpt, tmp_path, paths, out, chains=None, **data_args):
    cfg = load("eval_tiny.yaml")
    cfg["data"] = {"class_path": "vitavla.rollout.calvin_datamodule.CalvinRolloutDataModule", "init_args": {
        "env": {"class_path": "vitavla.rollout.calvin_env.CalvinSimEnv",
                "init_args": {"dataset_path": str(paths["dataset"]), "conf_dir": str(paths["conf"])}},
        "chains": None if chains is None else str(chains), "num_chains": 3, "ep_len": 3, "out_dir": str(out),
        "allow_missing_normalizer": True, **data_args}}
    path = tmp_path / "eval_calvin_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["test", "--config", str(path), "--ckpt_path", str(ckpt), f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.save_dir={tmp_path}", *QUIET])
    return json.loads((out / "results.json").read_text())


def test_vitavla_test_runs_calvin_chains_resumes_and_survives_a_crash(stage2_ckpt, tmp_path, monkeypatch):
    paths = build_fake(tmp_path, crash_instances=[0], crash_at=1)  # the first simulator dies at its 2nd step
    install_fake(monkeypatch, paths)
    try:
        out = tmp_path / "rollout"
        res = calvin_test(stage2_ckpt, tmp_path, paths, out)
        recs = [json.loads(x) for x in (out / "episodes.rank0.jsonl").read_text().splitlines()]
        assert [(r["chain"], r["attempt"], r["error"] is None) for r in recs] == [
            (0, 0, False), (0, 1, True), (1, 0, True), (2, 0, True)]
        finals = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
        completed = [r["completed"] for r in finals]
        assert res["errors"] == 0 and res["chains"] == 3 and len(finals) == 3
        assert res["avg_seq_len"] == pytest.approx(sum(completed) / 3)
        assert res["chain_sr"]["1"] == pytest.approx(sum(c >= 1 for c in completed) / 3)
        assert res["env"] == "CalvinSimEnv" and res["ep_len"] == 3

        first = (out / "episodes.rank0.jsonl").read_text()
        again = calvin_test(stage2_ckpt, tmp_path, paths, out)  # same out_dir: nothing re-runs
        assert (out / "episodes.rank0.jsonl").read_text() == first
        keys = ("avg_seq_len", "chain_sr", "chains", "errors", "task_info")
        assert {k: again[k] for k in keys} == {k: res[k] for k in keys}
        # The same out_dir with another chain set is refused instead of mixing results.
        other = tmp_path / "other.json"
        other.write_text(json.dumps([[{"robot_obs": [0.0] * 15, "scene_obs": [0.0] * 24},
                                      ["close_drawer", "open_drawer", "turn_on_led", "push_red_block_left",
                                       "move_slider_left"]]] * 3))
        with pytest.raises(ValueError, match="do not match the configured chains"):
            calvin_test(stage2_ckpt, tmp_path, paths, out, chains=other)
    finally:
        forget()


def test_parallel_calvin_chains_equal_one_simulator_and_write_videos_plot_and_sheet(stage2_ckpt, tmp_path,
                                                                                   monkeypatch):
    import av

    # Progress is 2 x the first action value per step: four subtasks are done at their first step, one
    # depends on the policy's actions, one (2.0 in 3 steps) never; chains end at different depths.
    easy = dict.fromkeys(["open_drawer", "lift_blue_block_table", "push_red_block_left", "turn_on_led"], -10.0)
    paths = build_fake(tmp_path, progress={**easy, "close_drawer": 0.0})
    install_fake(monkeypatch, paths)  # on sys.path, so the spawned simulator workers import the fake too
    try:
        one = calvin_test(stage2_ckpt, tmp_path, paths, tmp_path / "one", num_chains=4, record_videos=1)
        two = calvin_test(stage2_ckpt, tmp_path, paths, tmp_path / "two", num_chains=4, num_envs=2,
                          record_videos=1)
    finally:
        forget()

    def finals(name):
        return [json.loads(x) for x in (tmp_path / name / "episodes.jsonl").read_text().splitlines()]

    keys = ("chain", "subtasks", "completed", "steps", "error")
    assert [{k: r[k] for k in keys} for r in finals("two")] == [{k: r[k] for k in keys} for r in finals("one")]
    assert two["num_envs"] == 2 and one["num_envs"] == 1 and two["chains"] == 4 and two["errors"] == 0
    assert {k: two[k] for k in ("avg_seq_len", "chain_sr", "task_info")} == {
        k: one[k] for k in ("avg_seq_len", "chain_sr", "task_info")}
    assert any(r["completed"] > 0 for r in finals("two"))  # the subtask waves went past the first subtask
    for name in ("one", "two"):
        out = tmp_path / name
        rec = finals(name)[0]
        (video,) = (out / "videos").glob("*.mp4")  # record_videos=1: chain 0 only
        assert video.name == f"chain0000_{rec['completed']}of5.mp4"
        with av.open(str(video)) as f:
            n_frames = sum(1 for _ in f.decode(video=0))
            assert n_frames == sum(rec["steps"]) + 1  # the reset frame, then one per step, every subtask
        assert len(list((out / "first_last").glob("*.png"))) == 4  # every chain's first and last frame
        assert (out / "chain_sr.png").is_file() and (out / "first_last.png").is_file()


def test_a_broken_install_stops_vitavla_test_with_the_hint_and_a_rerun_retries_earlier_errors(
        stage2_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "rollout"
    broken = build_fake(tmp_path / "broken", utils_needs="hydra_absent_here")  # calvin_models without hydra
    install_fake(monkeypatch, broken)
    try:
        with pytest.raises(SystemExit) as e:
            calvin_test(stage2_ckpt, tmp_path, broken, out)
        # The project's message (what needs what, and how to install), not only "No module named ...".
        assert str(e.value.code).startswith(
            "vitavla: error: MissingDependencyError: the symbolic initial states of the official chains needs "
            "calvin_agent.evaluation.utils (ModuleNotFoundError: No module named 'hydra_absent_here'). "
            "calvin_env and calvin_models are not on PyPI")
        assert "pip install --no-deps -e calvin/calvin_env -e calvin/calvin_models" in str(e.value.code)
        assert not list(out.glob("episodes*.jsonl"))  # no chain was recorded as a simulator crash
    finally:
        forget()
    # What the earlier version recorded in that situation: every chain "crashed" twice.
    chains = [[*json.loads(json.dumps(c.subtasks))] for c in _official_prefix(broken, monkeypatch, 3)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "episodes.rank0.jsonl", "w") as f:
        for i, subtasks in enumerate(chains):
            for attempt in (0, 1):
                f.write(json.dumps({"chain": i, "task": 0, "episode": i, "seed": 0, "subtasks": subtasks,
                                    "completed": 0, "steps": [], "success": False, "attempt": attempt,
                                    "error": "ImportError: a symbolic CALVIN initial state needs ...",
                                    "task_name": "calvin_long_horizon"}) + "\n")
    fixed = build_fake(tmp_path / "fixed")
    install_fake(monkeypatch, fixed)
    try:
        res = calvin_test(stage2_ckpt, tmp_path, fixed, out)  # the install is fixed: those chains run now
        assert res["chains"] == 3 and res["errors"] == 0 and res["error_details"] == []
        recs = [json.loads(x) for x in (out / "episodes.rank0.jsonl").read_text().splitlines()]
        assert [(r["chain"], r["error"] is None) for r in recs[6:]] == [(0, True), (1, True), (2, True)]
    finally:
        forget()


def _official_prefix(paths, monkeypatch, n):
    """The first ``n`` chains of the (fake) official set, read with the package tree of ``paths``."""
    from vitavla.rollout.calvin_env import load_calvin_chains

    install_fake(monkeypatch, paths)
    try:
        return load_calvin_chains(None, n)
    finally:
        forget()


@pytest.fixture
def real_calvin(tmp_path, monkeypatch):
    """Skips unless the real calvin_env and calvin_models (with its conf/) are installed; the composed
    simulator config goes under tmp_path."""
    from vitavla.rollout import calvin_env

    forget()
    if importlib.util.find_spec("calvin_env") is None:
        pytest.skip("calvin_env is not installed; see docs/evaluation.md for the install")
    real_calvin_agent()
    conf = calvin_env.default_conf_dir()
    if conf is None or not (conf / calvin_env.TASKS_CONFIG).is_file():
        pytest.skip("calvin_models is installed without its conf/ (install it editable from the checkout)")
    monkeypatch.setattr(calvin_env, "CACHE_DIR", tmp_path / "cache")


@pytest.mark.calvin
@pytest.mark.slow
def test_vitavla_test_against_the_real_calvin_env(real_calvin, stage2_ckpt, tmp_path):
    from vitavla.rollout.calvin_env import load_chains, write_chains

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "calvin" / "official_chains_first20.json"
    chains = write_chains(tmp_path / "chains.json", load_chains(fixture)[:2], resolve_states=True)
    out = tmp_path / "rollout"
    cfg = load("eval_tiny.yaml")
    cfg["data"] = {"class_path": "vitavla.rollout.calvin_datamodule.CalvinRolloutDataModule", "init_args": {
        "env": {"class_path": "vitavla.rollout.calvin_env.CalvinSimEnv", "init_args": {"dataset_path": None}},
        "chains": str(chains), "num_chains": 2, "ep_len": 2, "out_dir": str(out),
        "allow_missing_normalizer": True}}
    path = tmp_path / "eval_calvin_real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["test", "--config", str(path), "--ckpt_path", str(stage2_ckpt),
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}", *QUIET]
    main(args)
    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == 0 and res["chains"] == 2 and res["env"] == "CalvinSimEnv"
    recs = [json.loads(x) for x in (out / "episodes.rank0.jsonl").read_text().splitlines()]
    assert [r["chain"] for r in recs] == [0, 1] and all(r["error"] is None for r in recs)
    # An untrained policy in 2 steps: the first subtask fails and the chain stops there.
    assert [(r["completed"], r["steps"]) for r in recs] == [(0, [2]), (0, [2])]
    first = (out / "episodes.rank0.jsonl").read_text()
    main(args)  # resume: both chains are finished, nothing runs again
    assert (out / "episodes.rank0.jsonl").read_text() == first
    # What a person looks at: the chain_sr plot, every chain's first/last frame, and the recorded chains'
    # videos at >= 256 px (CALVIN's 200 px static camera, enlarged 2x under the instruction banner).
    import av
    from PIL import Image

    assert (out / "chain_sr.png").is_file() and (out / "first_last.png").is_file()
    videos = sorted((out / "videos").glob("*.mp4"))
    assert [v.name for v in videos] == ["chain0000_0of5.mp4", "chain0001_0of5.mp4"]
    with av.open(str(videos[0])) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape[1] == 400 and frames[0].shape[0] > 400
    with Image.open(out / "first_last.png") as sheet:
        assert sheet.height > 128
    # Two simulators in parallel (worker processes, batched policy calls): the same records.
    cfg["data"]["init_args"].update(out_dir=str(tmp_path / "rollout2"), num_envs=2)
    path.write_text(yaml.safe_dump(cfg))
    main(args)
    two = [json.loads(x) for x in (tmp_path / "rollout2" / "episodes.rank0.jsonl").read_text().splitlines()]
    keys = ("chain", "completed", "steps", "error", "subtasks")
    assert [{k: r[k] for k in keys} for r in two] == [{k: r[k] for k in keys} for r in recs]
