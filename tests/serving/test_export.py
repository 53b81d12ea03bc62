"""`vitavla export`: a self-contained policy directory that acts exactly like the checkpoint it came from."""

import json
import shutil

import pytest
import torch

from cli import main
from vitavla.rollout.env import Obs
from vitavla.rollout.runner import to_observation
from vitavla.serving.export import (SPEC_FILE, WEIGHTS_FILE, ExportError, export_from_config, load_policy_dir,
                                    sha256_file)
from vitavla.streaming import StreamingPolicy

from tests.serving.conftest import EVAL_TINY, NORMALIZER, observations


def _rollout(policy, obs_list, normalizer, image_size):
    out = []
    for o in obs_list:
        obs = Obs(o["observation/image"], o["observation/wrist_image"], o["observation/state"], o["prompt"])
        act = policy.step(to_observation(obs, image_size, normalizer=normalizer))
        out.append(torch.cat([act.arm, act.gripper_logit], -1))
    return torch.stack(out)


def test_exported_dir_gives_identical_actions_and_records_provenance(tiny_export):
    out, ckpt, module = tiny_export
    exported = load_policy_dir(out)
    # Six steps with history 4: the streaming cache refills twice, on both sides.
    obs = observations(6)
    src = _rollout(StreamingPolicy(module.policy.eval()), obs, NORMALIZER, 224)
    dst = _rollout(exported.streaming(), obs, exported.normalizer, exported.image_size)
    assert torch.equal(src, dst)
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
