"""`vitavla fit` end to end: both stages from the tiny configs, teacher swap by class_path, DeepSpeed, errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main
from tests.conftest import CONFIGS, FAST_SYNTHETIC, ONLY_FINETUNE, fit


def test_fit_stage1_then_stage2_from_the_command_line(tmp_path):
    stage1 = fit("tiny_align.yaml", tmp_path / "align")
    sd = torch.load(stage1, map_location="cpu", weights_only=True)["state_dict"]
    assert set(sd) == {"student.action_token", *{k for k in sd if k.startswith(("student.state_encoder.", "mapper."))}}
    assert any(k.startswith("mapper.") for k in sd)
    stage2 = fit("tiny_finetune.yaml", tmp_path / "finetune", f"--model.init_args.init_from={stage1}")
    sd2 = torch.load(stage2, map_location="cpu", weights_only=True)["state_dict"]
    assert any(".language_model." in k for k in sd2) and any(k.startswith("policy.action_head.") for k in sd2)
    assert not any("vision_tower" in k for k in sd2)  # frozen weights come from the config, not the ckpt


def test_teacher_is_swapped_by_class_path_alone(tmp_path):
    override = tmp_path / "teacher.yaml"
    override.write_text(
        "model:\n  init_args:\n    teacher:\n      class_path: teachers.TransformerTeacher\n"
        "      init_args: {hidden_size: 48, num_layers: 1, max_steps: 8}\n")
    ckpt = fit("tiny_align.yaml", tmp_path / "align", "--config", str(override))
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert sd["mapper.net.4.weight"].shape[0] == 48  # the mapper now targets the new teacher's width


@pytest.mark.deepspeed
def test_deepspeed_stage_2_runs_a_step_on_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    main(["fit", "--config", str(CONFIGS / "tiny_align.yaml"), f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.save_dir={tmp_path}", *FAST_SYNTHETIC, "--trainer.max_steps=1",
          "--trainer.strategy=deepspeed_stage_2"])
    assert list(tmp_path.glob("version_*/checkpoints/*.ckpt"))


def test_inconsistent_config_fails_with_one_clear_message(tmp_path):
    with pytest.raises(SystemExit, match=r"mapper_out_dim=99 but the teacher \(SeerTeacher\) has hidden size"):
        main(["fit", "--config", str(CONFIGS / "tiny_align.yaml"), f"--trainer.default_root_dir={tmp_path}",
              "--model.init_args.mapper_out_dim=99", *FAST_SYNTHETIC])
    with pytest.raises(SystemExit, match="checkpoint not found: .*missing.ckpt"):
        main(["fit", "--config", str(CONFIGS / "tiny_finetune.yaml"), f"--trainer.default_root_dir={tmp_path}",
              f"--model.init_args.init_from={tmp_path / 'missing.ckpt'}", *FAST_SYNTHETIC])
    # jsonargparse turns a command-line null for a nested class's argument into 'None': the error says so.
    with pytest.raises(SystemExit, match="checkpoint not found: None .*arrives as the string 'None'.*YAML"):
        main(["fit", "--config", str(CONFIGS / "tiny_align.yaml"), f"--trainer.default_root_dir={tmp_path}",
              "--model.init_args.teacher.init_args.checkpoint=null", *FAST_SYNTHETIC])
    # Data images of another size than the backbone's: one line naming both keys (was a 35-line traceback).
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIGS / "tiny_align.yaml"), f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.image_size=64",
              *FAST_SYNTHETIC])
    assert str(e.value.code) == (
        "vitavla: error: ConfigError: data.init_args.image_size: SyntheticWindowDataModule yields 64px "
        "images but the student backbone is configured for 224px "
        "(model.init_args.student.init_args.backbone.init_args.image_size); set both to the same size")


SCRIPT = shutil.which("vitavla", path=str(Path(sys.executable).parent)) or shutil.which("vitavla")


@pytest.mark.skipif(SCRIPT is None, reason="console script not installed")
def test_console_script_help_shows_field_docs():
    out = subprocess.run([SCRIPT, "fit", "--model.help", "vitavla.modules.DistillationModule", "--model.optim.help"],
                         capture_output=True, text=True, timeout=120, executable=None)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Peak learning rate" in out.stdout  # OptimConfig field docstring


def test_paper_configs_parse():
    from cli import build_cli

    for name in ("align_calvin", "finetune_calvin", "align_libero", "finetune_libero"):
        with pytest.raises(SystemExit) as e:
            build_cli(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"], run=True)
        assert e.value.code in (0, None), name


def test_eval_configs_parse():
    from cli import build_cli

    for name in ("eval_libero", "eval_tiny"):
        with pytest.raises(SystemExit) as e:
            build_cli(["test", "--config", str(CONFIGS / f"{name}.yaml"), "--print_config"], run=True)
        assert e.value.code in (0, None), name


# -- issue 16: nothing silent, nothing lost ------------------------------------------------------------------
EVAL_TINY = ["--data.init_args.episodes_per_task=1", "--data.init_args.env.init_args.steps=2",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def dirs(root: Path) -> list[str]:
    return [f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"]


def test_a_checkpoint_of_another_module_is_refused_by_every_loader(tmp_path):
    stage1 = fit("tiny_align.yaml", tmp_path / "align")
    refusal = (rf"(?s)vitavla: error: CheckpointMismatchError: {stage1} does not fit PolicyModule.*"
               r"missing keys \(\d+\): policy\..*unexpected keys \(13\): mapper\.net\..*and 9 more")
    out = tmp_path / "eval" / "rollout"
    with pytest.raises(SystemExit, match=refusal):  # today: exit 0, an untrained policy evaluated
        main(["test", "--config", str(CONFIGS / "eval_tiny.yaml"), "--ckpt_path", str(stage1),
              *dirs(tmp_path / "eval"), f"--data.init_args.out_dir={out}", *EVAL_TINY])
    assert not (out / "results.json").exists() and not list(out.glob("episodes*.jsonl"))
    finetune = ["--config", str(CONFIGS / "tiny_finetune.yaml"), "--ckpt_path", str(stage1), *FAST_SYNTHETIC,
                *ONLY_FINETUNE]
    with pytest.raises(SystemExit, match=refusal):
        main(["validate", *finetune, *dirs(tmp_path / "validate")])
    with pytest.raises(SystemExit, match=refusal):  # before the optimizer's "parameter group" error
        main(["fit", *finetune, *dirs(tmp_path / "fit")])
    with pytest.raises(SystemExit, match=refusal):  # export goes through the same check
        main(["export", "--config", str(CONFIGS / "eval_tiny.yaml"), "--ckpt_path", str(stage1),
              "--out", str(tmp_path / "policy")])
    assert not (tmp_path / "policy" / "policy.json").exists()
    assert not list((tmp_path / "fit").rglob("*.ckpt"))
    # The teacher's export at the end of fit would write whatever weights were restored.
    with pytest.raises(SystemExit, match=rf"{stage1} does not fit TeacherModule"):
        main(["fit", "--config", str(CONFIGS / "tiny_teacher.yaml"), "--ckpt_path", str(stage1),
              *FAST_SYNTHETIC, *dirs(tmp_path / "teacher")])
    assert not list((tmp_path / "teacher").rglob("teacher.safetensors"))


def test_failed_checkpoint_save_keeps_last_ckpt_and_bad_files_fail_in_one_line(tmp_path, monkeypatch):
    import errno

    root = tmp_path / "run"
    same_dir = [*dirs(root), "--trainer.logger.init_args.version=0"]  # resumes write into the same directory
    last = fit("tiny_align.yaml", root, "--trainer.logger.init_args.version=0")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    resume = ["fit", "--config", str(CONFIGS / "tiny_align.yaml"), *FAST_SYNTHETIC, *same_dir,
              "--ckpt_path", str(last), "--trainer.max_steps=4"]
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=r"could not save checkpoint .*\.ckpt: No space left on device"):
        main(resume)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(last, weights_only=True)["global_step"] == 2  # the previous last.ckpt, intact
    assert not [p for p in last.parent.iterdir() if p.suffix != ".ckpt"]  # no temporary files left
    main(resume)
    assert torch.load(last, weights_only=True)["global_step"] == 4  # a successful save replaces it
    assert not [p for p in last.parent.iterdir() if p.suffix != ".ckpt"]

    from cli import build_cli
    from vitavla.checkpoint_io import AtomicCheckpointIO

    cli = build_cli(["--config", str(CONFIGS / "tiny_align.yaml"), *same_dir], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # the CLI's default

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(last.read_bytes()[:50_000])
    with pytest.raises(SystemExit, match=r"^vitavla: error: CheckpointReadError: .*cut.ckpt cannot be read"):
        main(["test", "--config", str(CONFIGS / "eval_tiny.yaml"), "--ckpt_path", str(cut),
              *dirs(tmp_path / "eval"), *EVAL_TINY])
    # Stage 2's init_from: today the project's message naming the file is dropped.
    with pytest.raises(SystemExit, match=r"^vitavla: error: CheckpointReadError: .*cut.ckpt cannot be read"):
        main(["fit", "--config", str(CONFIGS / "tiny_finetune.yaml"), f"--model.init_args.init_from={cut}",
              *FAST_SYNTHETIC, *dirs(tmp_path / "finetune")])


def test_missing_data_root_and_unwritable_output_dirs_fail_at_setup_naming_the_key(tmp_path):
    libero = tmp_path / "libero.yaml"
    libero.write_text("data:\n  class_path: datamodules.LiberoDataModule\n"
                      f"  init_args: {{root: {tmp_path / 'nowhere'}, num_steps: 4, image_size: 224}}\n")
    with pytest.raises(SystemExit, match=rf"^vitavla: error: DataError: {tmp_path / 'nowhere'}: "
                                         r"data.init_args.root: does not exist$"):
        main(["fit", "--config", str(CONFIGS / "tiny_align.yaml"), "--config", str(libero), *dirs(tmp_path / "r")])
    blocker = tmp_path / "a_file"  # as root, chmod does not stop writes; a file in the path does
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"^vitavla: error: UserFacingError: trainer.default_root_dir: "
                                         r".*a_file/run is not a writable directory"):
        main(["fit", "--config", str(CONFIGS / "tiny_align.yaml"), *FAST_SYNTHETIC, *dirs(blocker / "run")])
    stage1 = fit("tiny_align.yaml", tmp_path / "align")
    with pytest.raises(SystemExit, match=r"^vitavla: error: UserFacingError: data.init_args.out_dir: "
                                         r".*a_file/rollout is not a writable directory"):
        main(["test", "--config", str(CONFIGS / "eval_tiny.yaml"), "--ckpt_path", str(stage1),
              *dirs(tmp_path / "eval"), f"--data.init_args.out_dir={blocker / 'rollout'}", *EVAL_TINY])


@pytest.mark.parametrize("bad, named", [
    (["--trainer.max_stepz=3"], "--trainer.max_stepz=3"),
    (["--model.init_args.mapper_hiden_dim=3"], "Option 'mapper_hiden_dim' is not accepted"),
])
def test_misspelled_key_prints_the_line_naming_it_and_a_help_hint(bad, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIGS / "tiny_align.yaml"), *bad])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and named in err[0] and err[0].startswith("vitavla: error: "), err  # today: ~50 lines
    assert "fit --help" in err[1]


def test_step_bounded_runs_get_a_progress_label_without_a_negative_epoch_bound(tmp_path):
    """Lightning's rich bar labels a max_steps run "Epoch 2/-2"; the CLI's default bar says "Epoch 2 (max 7
    steps)", keeps Lightning's label with an epoch bound, and is not added when a bar is configured."""
    from cli import build_cli
    from lightning.pytorch.callbacks import TQDMProgressBar

    from vitavla.progress import StepProgressBar

    out = [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]

    def bars(*extra):
        cli = build_cli(["--config", str(CONFIGS / "tiny_align.yaml"), *out, *extra], run=False)
        found = [c for c in cli.trainer.callbacks if isinstance(c, (StepProgressBar, TQDMProgressBar))]
        for bar in found:
            bar.setup(cli.trainer, cli.model, stage="fit")  # what the trainer does at the start of fit
        return cli.trainer, found

    trainer, (bar,) = bars("--trainer.max_epochs=-1", "--trainer.max_steps=7")
    assert isinstance(bar, StepProgressBar)
    assert bar._get_train_description(2).strip() == "Epoch 2 (max 7 steps)"
    trainer, (bar,) = bars("--trainer.max_epochs=3")
    assert bar._get_train_description(2).strip() == "Epoch 2/2"
    _, configured = bars("--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar")
    assert [type(b) for b in configured] == [TQDMProgressBar]
    _, none = bars("--trainer.enable_progress_bar=false")
    assert none == []


def test_fit_sends_third_party_output_to_the_run_log_and_verbose_keeps_it_on_the_console(tmp_path, capsys):
    """Lightning's "GPU available", "Seed set" and tips go to <save_dir>/vitavla-fit.log, not the console."""
    fit("tiny_align.yaml", tmp_path / "quiet", "--seed_everything=1")
    out = capsys.readouterr()
    log = tmp_path / "quiet" / "vitavla-fit.log"
    assert "GPU available" in log.read_text() and "Seed set" in log.read_text()
    assert "GPU available" not in out.out + out.err and str(log) in out.out
    fit("tiny_align.yaml", tmp_path / "verbose", "--seed_everything=1", "--verbose")
    assert not (tmp_path / "verbose" / "vitavla-fit.log").exists()
