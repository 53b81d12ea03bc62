"""`--trainer.devices=2` from a plain command line (no torchrun, no SLURM): Lightning's subprocess launcher
restarts the command for rank 1 from ``sys.argv``, so that command must be the one the user typed.

Both runs go through ``python cli.py`` in a fresh process, as the ``vitavla`` console script does (a script
run, so Lightning restarts it as ``python <script> <args>``), on CPU with gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TWO_CPU_PROCESSES = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


def vitavla(*args: str, timeout: int = 170) -> str:
    """Run ``python cli.py ARGS`` as a new process; returns stdout + stderr, failing the test on a non-zero
    exit with the end of the output."""
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # An in-process Lightning test earlier in the session (DeepSpeed, DDP on one device) leaves MASTER_PORT and
    # friends in os.environ while its process group still listens on that port: inherited, they make rank 0
    # here fail with EADDRINUSE. A fresh command line starts from a clean launch environment.
    launch = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
              "LOCAL_WORLD_SIZE"}
    env = {**{k: v for k, v in os.environ.items() if k not in launch}, "PYTHONPATH": pythonpath,
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    return text


def with_run_logs(console: str, root: Path) -> str:
    """The console plus the run's third-party log files, where Lightning's launch lines go (one file per rank:
    ``vitavla-<cmd>.log``, ``vitavla-<cmd>.rank1.log``)."""
    return console + "".join(p.read_text() for p in sorted(root.glob("vitavla-*.log")))


@pytest.mark.slow
def test_fit_and_test_on_two_cpu_processes_from_the_command_line(tmp_path):
    fit_root = tmp_path / "fit"
    log = vitavla("fit", "--config", str(CONFIGS / "tiny_finetune.yaml"), *TWO_CPU_PROCESSES,
                  f"--trainer.default_root_dir={fit_root}", f"--trainer.logger.init_args.save_dir={fit_root}",
                  "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                  "--model.init_args.init_mode=only_finetune", "--model.init_args.init_from=null",
                  "--data.init_args.num_episodes=4", "--data.init_args.episode_length=6",
                  "--data.init_args.batch_size=2", *QUIET)
    assert f"third-party warnings and logs: {fit_root / 'vitavla-fit.log'}" in log
    log = with_run_logs(log, fit_root)
    # Rank 1 was started by Lightning from the re-built command line and joined the process group.
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    assert 'expected "subcommand"' not in log
    (ckpt,) = fit_root.glob("version_*/checkpoints/last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2

    out = tmp_path / "test" / "rollout"
    log = vitavla("test", "--config", str(CONFIGS / "eval_tiny.yaml"), "--ckpt_path", str(ckpt),
                  *TWO_CPU_PROCESSES, f"--trainer.default_root_dir={tmp_path / 'test'}",
                  f"--trainer.logger.init_args.save_dir={tmp_path / 'test'}", f"--data.init_args.out_dir={out}",
                  "--data.init_args.episodes_per_task=1", "--data.init_args.env.init_args.steps=2",
                  "--data.init_args.record_videos_per_task=0", *QUIET)
    log = with_run_logs(log, tmp_path / "test")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["episodes"] + res["errors"] == 2
    # The two episodes (one per task) were sharded: one per process, each run exactly once.
    per_rank = {p.name: [(r["task"], r["episode"]) for r in map(json.loads, p.read_text().splitlines())]
                for p in sorted(out.glob("episodes.rank*.jsonl"))}
    assert sorted(per_rank) == ["episodes.rank0.jsonl", "episodes.rank1.jsonl"]
    assert sorted(x for recs in per_rank.values() for x in recs) == [(0, 0), (1, 0)]
    assert all(len(recs) == 1 for recs in per_rank.values())


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_two_process_ddp_gives_the_loss_of_one_process_on_the_same_global_batch(stage, tmp_path):
    """Both stages: 2 gloo processes with 2 windows each against 1 process with the same 4 windows per step
    (the sampler gives rank r the windows r, r + 2, ... of the one-process order).

    Each process's loss is a mean over its own valid (unpadded) steps and actions, and DDP averages the
    processes' gradients: the 2-process step optimises the mean of the two shard losses. The one-process run
    computes exactly that on its first batch (tests/loss_recorder.py, ``shards=2``), and the 2-process loss
    and averaged gradients must equal it to float precision. Against the one-process loss of the whole batch
    (a mean weighted by every window's count of valid entries) they differ where windows near an episode's
    end carry fewer entries: a fraction of a percent here. Weights after the steps are not compared: AdamW's
    first steps move every weight by about lr times the sign of its gradient, so gradients within float noise
    of zero flip."""
    config = CONFIGS / f"tiny_{stage}.yaml"
    extra = ["--model.init_args.init_mode=only_finetune", "--model.init_args.init_from=null"] if stage == "finetune" \
        else []
    common = ["--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
              "--data.init_args.num_episodes=4", "--data.init_args.episode_length=8",
              "--trainer.accelerator=cpu", "--seed_everything=0", *extra, *QUIET]
    runs = {}
    for name, procs, batch, shards in (("one", ["--trainer.devices=1"], 4, 2), ("two", TWO_CPU_PROCESSES[1:], 2, 0)):
        root = tmp_path / name
        vitavla("fit", "--config", str(config), *procs, f"--data.init_args.batch_size={batch}",
                f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
                "--trainer.callbacks+=tests.loss_recorder.LossRecorder",
                f"--trainer.callbacks.init_args.out_dir={root / 'record'}",
                f"--trainer.callbacks.init_args.shards={shards}", *common, timeout=300)
        runs[name] = [json.loads(p.read_text()) for p in sorted((root / "record").glob("losses.rank*.json"))]
        assert len(runs[name]) == (2 if name == "two" else 1) and all(len(x) == 2 for x in runs[name])
    record = {n: tmp_path / n / "record" for n in runs}
    expected = json.loads((record["one"] / "shards0.json").read_text())["loss"]
    two = (runs["two"][0][0] + runs["two"][1][0]) / 2
    assert two == pytest.approx(expected, rel=1e-5)
    assert two == pytest.approx(runs["one"][0][0], rel=1e-2)  # the whole-batch mean: close, not equal
    want = torch.load(record["one"] / "shard_grads0.pt", weights_only=True)
    got = torch.load(record["two"] / "grads0.pt", weights_only=True)
    assert set(want) == set(got) and want
    scale = max(g.abs().max() for g in want.values())
    for key, g in want.items():
        torch.testing.assert_close(got[key], g, atol=1e-5 * scale, rtol=0, msg=key)
