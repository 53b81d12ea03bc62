"""`vitavla export`: a self-contained policy directory that acts exactly like the checkpoint it came from."""

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main
from vitavla.rollout.env import Obs
from vitavla.rollout.runner import to_observation
from vitavla.serving.export import (SPEC_FILE, WEIGHTS_FILE, ExportError, export_from_config, load_policy_dir,
                                    sha256_file)
from vitavla.streaming import StreamingPolicy

from tests.serving.conftest import (EVAL_TINY, NORMALIZER, TINY_ALIGN, make_checkpoint, observations,
                                    trained_module)

# A policy loaded from its exported directory has bit-identical weights, config and buffers, and its LLM and
# vision tower give bit-identical outputs on the same inputs; its actions still differ from the in-process
# module's by float round-off (1.3e-7 measured with transformers 5.24 and torch 2.13), so actions are compared
# to 1e-6: far below what a wrong or missing weight changes (1e-2 and more).
ACTION_ATOL = 1e-6


def _rollout(policy, obs_list, normalizer, image_size):
    out = []
    for o in obs_list:
        obs = Obs(o["observation/image"], o["observation/wrist_image"], o["observation/state"], o["prompt"])
        act = policy.step(to_observation(obs, image_size, normalizer=normalizer))
        out.append(torch.cat([act.arm, act.gripper_logit], -1))
    return torch.stack(out)

REPO = Path(__file__).resolve().parents[2]


def test_exported_dir_gives_identical_actions_and_records_provenance(tiny_export):
    out, ckpt, module = tiny_export
    exported = load_policy_dir(out)
    # Six steps with history 4: the streaming cache refills twice, on both sides.
    obs = observations(6)
    src = _rollout(StreamingPolicy(module.policy.eval()), obs, NORMALIZER, 224)
    dst = _rollout(exported.streaming(), obs, exported.normalizer, exported.image_size)
    torch.testing.assert_close(src, dst, rtol=0, atol=ACTION_ATOL)
    # Every weight is in the file, frozen vision tower included, bit for bit.
    ref = module.policy.state_dict()
    got = exported.policy.state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    assert any("vision_tower" in k for k in got)
    doc = json.loads((out / SPEC_FILE).read_text())
    assert doc["provenance"]["checkpoint_sha256"] == sha256_file(ckpt)
    assert doc["provenance"]["weights_sha256"] == sha256_file(out / WEIGHTS_FILE)
    assert "vitavla.modules.PolicyModule" in (out / "source_config.yaml").read_text()
    assert doc["robot"] == {"arm_dim": 6, "gripper_dim": 1, "gripper_state": "binary",
                            "gripper_state_dim": None, "action_chunk": 3}
    assert (doc["image_size"], doc["history_length"], doc["action_units"]) == (224, 4, "robot")
    assert exported.normalizer == NORMALIZER
    assert (out / "backbone" / "tokenizer.json").is_file() and (out / "backbone" / "config.json").is_file()
    # The tokenizer read back from the directory gives the training tokenizer's ids.
    texts = ["pick up the red block", "put the mug in the microwave and close it"]
    assert exported.policy.student.backbone.tokenize(texts) == module.policy.student.backbone.tokenize(texts)


def _copy(out, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def test_loading_refuses_foreign_classes_and_changed_weights(tiny_export, tmp_path):
    out, _, _ = tiny_export
    bad = _copy(out, tmp_path)
    doc = json.loads((bad / SPEC_FILE).read_text())
    doc["policy"]["init_args"]["mapper"]["class_path"] = "os.system"
    (bad / SPEC_FILE).write_text(json.dumps(doc))
    with pytest.raises(ExportError, match=r"policy\.mapper\.class_path 'os\.system' is not one of vitavla's"):
        load_policy_dir(bad)
    doc["policy"]["init_args"]["mapper"]["class_path"] = "vitavla.student.ActionMapper"
    doc["policy"]["init_args"]["student"]["init_args"]["backbone"]["init_args"]["trust_remote_code"] = True
    (bad / SPEC_FILE).write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="trust_remote_code=false"):
        load_policy_dir(bad)
    shutil.copy(out / SPEC_FILE, bad / SPEC_FILE)
    with open(bad / WEIGHTS_FILE, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ExportError, match="does not match the sha256 recorded"):
        load_policy_dir(bad)
    with pytest.raises(ExportError, match="not an exported policy directory"):
        load_policy_dir(tmp_path)


def test_export_cli_errors_name_the_problem(tiny_export, tmp_path, capsys):
    out, ckpt, _ = tiny_export
    with pytest.raises(SystemExit) as e:
        main(["export", "--config", str(EVAL_TINY), "--ckpt_path", str(ckpt), "--out", str(out)])
    assert "already exists; pass --overwrite true" in str(e.value)
    ckpt_dict = torch.load(ckpt, weights_only=True)
    del ckpt_dict["normalizer"]
    bare = tmp_path / "bare.ckpt"
    torch.save(ckpt_dict, bare)
    with pytest.raises(ExportError, match="has no action normalizer"):
        export_from_config([str(EVAL_TINY)], bare, tmp_path / "p")
    norm_free = export_from_config([str(EVAL_TINY)], bare, tmp_path / "p", allow_missing_normalizer=True)
    assert load_policy_dir(norm_free).spec["action_units"] == "normalized"


def test_vitavla_test_accepts_the_policy_dir(tiny_export, tmp_path):
    out, ckpt, _ = tiny_export
    common = ["--config", str(EVAL_TINY), "--trainer.enable_progress_bar=false", "--trainer.logger=false",
              "--trainer.enable_model_summary=false", "--data.init_args.episodes_per_task=1",
              "--data.init_args.env.init_args.steps=3", "--data.init_args.record_videos_per_task=0",
              "--data.init_args.allow_missing_normalizer=false"]
    records = []
    for name, path in (("ckpt", ckpt), ("dir", out)):
        root = tmp_path / name
        main(["test", *common, "--ckpt_path", str(path), f"--trainer.default_root_dir={root}",
              f"--data.init_args.out_dir={root / 'rollout'}"])
        res = json.loads((root / "rollout" / "results.json").read_text())
        assert res["episodes"] == 2 and res["errors"] == 0
        records.append([{k: r[k] for k in ("task", "episode", "success", "steps")} for r in
                        map(json.loads, (root / "rollout" / "episodes.jsonl").read_text().splitlines())])
    assert records[0] == records[1]
    assert res["ckpt_path"] is None  # the directory replaced the model; Lightning loaded no checkpoint


def test_observation_keys_are_set_at_export_and_checked(tiny_export, tmp_path):
    from vitavla.serving.export import export_policy

    exported = load_policy_dir(tiny_export[0])
    keys = {"views": ["cam_high", "cam_left_wrist"], "state": "qpos"}
    out = export_policy(exported.policy, tmp_path / "aloha_keys", exported.normalizer, obs_keys=keys)
    assert load_policy_dir(out).obs_keys == {**keys, "prompt": "prompt", "reset": "reset"}
    with pytest.raises(ExportError, match=r"views must list 2 observation keys .*got \['only_one'\]"):
        export_policy(exported.policy, tmp_path / "x", None, obs_keys={"views": ["only_one"]})
    with pytest.raises(ExportError, match=r"obs_keys has unknown fields \['camera'\]"):
        export_policy(exported.policy, tmp_path / "x", None, obs_keys={"camera": "c"})
    with pytest.raises(ExportError, match="uses a key twice"):
        export_policy(exported.policy, tmp_path / "x", None, obs_keys={"state": "prompt"})


def _same_policy(exported, policy):
    """Bit-identical weights (frozen ones included) and the same actions over a 6-step episode."""
    ref, got = policy.state_dict(), exported.policy.state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    obs = observations(6, seed=7)
    src = _rollout(StreamingPolicy(policy.eval()), obs, NORMALIZER, 224)
    torch.testing.assert_close(src, _rollout(exported.streaming(), obs, exported.normalizer, exported.image_size),
                               rtol=0, atol=ACTION_ATOL)


def test_stage1_checkpoint_exports_the_aligned_student(tmp_path):
    from cli import build_cli
    from vitavla.checkpoint_io import CheckpointMismatchError

    ckpt, module = make_checkpoint(tmp_path / "align.ckpt", config=TINY_ALIGN)
    out = export_from_config([str(TINY_ALIGN)], ckpt, tmp_path / "aligned")
    exported = load_policy_dir(out)
    # Student -> trained mapper -> the teacher's own action head, as in the DistillationModule.
    _same_policy(exported, module.deployable_policy())
    head = module.teacher.action_head.state_dict()
    assert all(torch.equal(v, exported.policy.action_head.state_dict()[k]) for k, v in head.items())
    doc = json.loads((out / SPEC_FILE).read_text())["provenance"]
    assert doc["source_module"] == "vitavla.modules.alignment.DistillationModule"
    assert (doc["checkpoint_kind"], doc["checkpoint_sha256"]) == ("lightning", sha256_file(ckpt))
    # It is exactly the policy stage 2 starts fine-tuning from (two_stage, init_from = this checkpoint).
    stage2 = build_cli(["--config", str(EVAL_TINY), "--trainer.logger=false",
                        "--model.init_args.init_mode=two_stage", f"--model.init_args.init_from={ckpt}"],
                       run=False).model
    start = stage2.policy.state_dict()
    assert all(torch.equal(start[k], v) for k, v in exported.policy.state_dict().items())
    # Given with the stage-2 config instead, the fit check names what is wrong.
    with pytest.raises(CheckpointMismatchError, match="stage-1 .DistillationModule. checkpoint goes to "
                                                      "PolicyModule's init_from"):
        export_from_config([str(EVAL_TINY)], ckpt, tmp_path / "wrong")


def test_checkpoint_paths_that_are_not_checkpoints_are_named(tiny_export, tmp_path):
    from vitavla.deepspeed_ckpt import DeepSpeedCheckpointError
    from vitavla.serving.sources import CheckpointSourceError

    out = tiny_export[0]
    with pytest.raises(CheckpointSourceError, match=f"--ckpt_path {tmp_path / 'nope'} does not exist"):
        export_from_config([str(EVAL_TINY)], tmp_path / "nope", tmp_path / "p")
    with pytest.raises(CheckpointSourceError, match="is already an exported policy directory"):
        export_from_config([str(EVAL_TINY)], out, tmp_path / "p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeepSpeedCheckpointError, match=r"empty is not a DeepSpeed checkpoint: expected a "
                                                       r"'latest' file naming a tag folder"):
        export_from_config([str(EVAL_TINY)], tmp_path / "empty", tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_loading_a_policy_dir_draws_no_random_weights(tiny_export):
    """The policy is built with its parameters on the meta device and the file's tensors become them:
    no random-number op runs on a real tensor, and the global RNG is untouched (a real build draws)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vitavla.serving.export import instantiate, read_spec

    class RandomOps(TorchDispatchMode):
        """Records every random-number op and the devices of its tensors."""

        NAMES = {"normal", "normal_", "uniform_", "randn", "rand", "randint", "random_", "bernoulli",
                 "bernoulli_", "exponential_", "randperm", "multinomial", "rand_like", "randn_like"}

        def __init__(self):
            super().__init__()
            self.real = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.__name__.split(".")[0] in self.NAMES:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]  # in-place ops: the target first
                device = tensors[0].device if tensors else torch.device(kwargs.get("device") or "cpu")
                if device.type != "meta":
                    self.real.append(func.__name__)
            return func(*args, **kwargs)

    out, _, module = tiny_export
    rng = torch.get_rng_state()
    with RandomOps() as ops:
        exported = load_policy_dir(out)
    assert ops.real == [] and torch.equal(rng, torch.get_rng_state())
    ref = module.policy.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in exported.policy.state_dict().items())
    assert all(t.device.type == "cpu" for t in [*exported.policy.parameters(), *exported.policy.buffers()])
    with RandomOps() as ops:  # the recorder sees a build that initialises for real
        instantiate(read_spec(out)["policy"], "policy", out)
    assert len(ops.real) > 10 and not torch.equal(rng, torch.get_rng_state())


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed extra not installed")


@pytest.fixture(scope="module")
def zero_checkpoints(tmp_path_factory):
    """``zero2.ckpt``, ``zero3.ckpt`` (stage 2) and ``zero2_align.ckpt`` (stage 1) of :func:`trained_module`,
    saved by two DeepSpeed ranks (separate processes, gloo over loopback) as Lightning's DeepSpeed strategy
    saves them (tests/serving/deepspeed_writer.py)."""
    root = tmp_path_factory.mktemp("zero")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "tests.serving.deepspeed_writer", str(root)]
    procs = [subprocess.Popen([*cmd, str(rank), "2", port], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    return root


@pytest.mark.deepspeed
@needs_deepspeed
@pytest.mark.parametrize("name,config,files", [("zero2", EVAL_TINY, 3), ("zero3", EVAL_TINY, 4),
                                               ("zero2_align", TINY_ALIGN, 3)])
def test_deepspeed_checkpoint_exports_like_the_module(zero_checkpoints, tmp_path, name, config, files):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vitavla.checkpoint_io import read_state_dict
    from vitavla.deepspeed_ckpt import read_zero_checkpoint

    ckpt = zero_checkpoints / f"{name}.ckpt"
    # The weights-only reader reassembles exactly what DeepSpeed's own (unpickling) converter does; init_from
    # (read_state_dict) reads DeepSpeed directories through it.
    ours, client = read_zero_checkpoint(ckpt)
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k].contiguous()) for k in theirs)
    assert read_state_dict(ckpt).keys() == ours.keys()
    assert client["normalizer"] == NORMALIZER.state_dict()
    out = export_from_config([str(config)], ckpt, tmp_path / "policy")
    exported = load_policy_dir(out)
    _same_policy(exported, trained_module(config).deployable_policy())
    assert exported.normalizer == NORMALIZER
    doc = json.loads((out / SPEC_FILE).read_text())["provenance"]
    shards = sorted(doc["checkpoint_files_sha256"])
    assert doc["checkpoint_kind"] == "deepspeed" and len(shards) == files
    assert all(doc["checkpoint_files_sha256"][f] == sha256_file(ckpt / f) for f in shards)


@pytest.mark.deepspeed
@needs_deepspeed
def test_broken_deepspeed_checkpoints_are_named(zero_checkpoints, tmp_path):
    from vitavla.deepspeed_ckpt import DeepSpeedCheckpointError, read_zero_checkpoint

    bad = tmp_path / "zero3.ckpt"
    shutil.copytree(zero_checkpoints / "zero3.ckpt", bad)
    (bad / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DeepSpeedCheckpointError, match=r"holds 1 \*_optim_states.pt shards, expected 2"):
        read_zero_checkpoint(bad)
    # A shard that pickles anything but tensors and DeepSpeed's known bookkeeping is refused, by name.
    model = bad / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"module": {}, "param_shapes": [], "hparams": argparse.Namespace(lr=1.0)}, model)
    with pytest.raises(DeepSpeedCheckpointError, match=r"rank_0_mp_rank_00_model_states.pt cannot be read "
                                                       r"with torch.load\(weights_only=True\): it "
                                                       r"pickles argparse.Namespace"):
        read_zero_checkpoint(bad)
    (bad / "latest").write_text("gone")
    shutil.rmtree(bad / "checkpoint")
    with pytest.raises(DeepSpeedCheckpointError, match="names the tag 'gone'"):
        read_zero_checkpoint(bad)
