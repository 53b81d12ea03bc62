"""``vitavla quickstart``: the whole method on tiny models, on CPU, in a few minutes.

Stage 1 aligns the student with the teacher (configs/tiny_align.yaml); stage 2 fine-tunes it in the
paper's three modes (configs/tiny_finetune.yaml). Each run is validated before and after training and the
results are printed as one table. Everything lands under ``--out`` (checkpoints, TensorBoard logs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning.pytorch.utilities import disable_possible_user_warnings


def _config_dir() -> Path:
    here = Path(__file__).resolve().parents[1] / "configs"
    return here if here.is_dir() else Path.cwd() / "configs"


def _run(config: Path, out: Path, name: str, epochs: int, extra: list[str]) -> dict[str, float]:
    from cli import build_cli

    run_dir = out / name
    args = [
        "--config", str(config),
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_model_summary=false",
        *extra,
    ]
    cli = build_cli(args, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    before = trainer.validate(model, datamodule=data, verbose=False)[0]
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    after = trainer.validate(model, datamodule=data, verbose=False)[0]
    trainable = sum(c["trainable"] for c in model.parameter_counts().values())
    return {"before": before, "after": after, "seconds": seconds, "trainable": trainable,
            "checkpoint": trainer.checkpoint_callback.last_model_path, "log_dir": trainer.log_dir}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(prog="vitavla quickstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart", help="run directory")
    ap.add_argument("--align-epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--configs", default=None, help="folder holding tiny_align.yaml and tiny_finetune.yaml")
    args = ap.parse_args(argv)
    disable_possible_user_warnings()
    cfg = Path(args.configs) if args.configs else _config_dir()
    out = Path(args.out)
    results = {"align": _run(cfg / "tiny_align.yaml", out, "align", args.align_epochs, [])}
    stage1 = results["align"]["checkpoint"]
    for mode in ("two_stage", "only_finetune", "freeze_vlm"):
        extra = [f"--model.init_args.init_mode={mode}",
                 f"--model.init_args.init_from={stage1 if mode != 'only_finetune' else 'null'}"]
        results[mode] = _run(cfg / "tiny_finetune.yaml", out, f"finetune_{mode}", args.finetune_epochs, extra)
    print(format_table(results))
    print(f"runs, checkpoints and TensorBoard logs: {out}/ (tensorboard --logdir {out})")
    return results


def format_table(results: dict[str, dict]) -> str:
    rows = [f"{'run':<16}{'metric':<16}{'before':>10}{'after':>10}{'trainable':>14}{'seconds':>9}"]
    for name, r in results.items():
        metric = "val/align_mse" if name == "align" else "val/arm_mae"
        rows.append(f"{name:<16}{metric:<16}{r['before'][metric]:>10.4f}{r['after'][metric]:>10.4f}"
                    f"{r['trainable']:>14,}{r['seconds']:>9.1f}")
        if name != "align":
            rows.append(f"{'':<16}{'val/gripper_acc':<16}{r['before']['val/gripper_acc']:>10.3f}"
                        f"{r['after']['val/gripper_acc']:>10.3f}")
    return "\n".join(rows)
