"""The LightningCLI of ``vitavla fit|validate|test|predict``: :func:`build_cli` and the ``VitaCLI`` class it builds.

``cli.py`` (the ``vitavla`` command) sits on top and re-exports :func:`build_cli`; code under ``vitavla/``
that needs a configured trainer and model (the quickstart, ``vitavla export``) imports them from here, so
nothing below ``cli.py`` imports it.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path
from typing import Any


def enable_attribute_docstrings() -> None:
    """Dataclass field docstrings (e.g. OptimConfig) become ``--help`` text."""
    import jsonargparse

    if hasattr(jsonargparse, "set_parsing_settings"):
        try:
            jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
            return
        except (TypeError, ValueError):
            pass
    if hasattr(jsonargparse, "set_docstring_parse_options"):
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)


@cache
def vita_cli_class() -> type:
    """The LightningCLI subclass, built on first use.

    Lightning is imported here, not at module level: simulator worker processes are spawned, and a spawned
    child re-imports the ``vitavla`` console script (``cli.py``, which imports this module) before it
    unpickles its env, so a top-level Lightning import would add seconds to every worker start.
    """
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class VitaArgumentParser(LightningArgumentParser):
        """Parse errors as the line that names the bad key and a pointer to ``--help``, without the ~50
        lines of usage jsonargparse prints first."""

        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error:
                return super().error(message, ex)
            parser = getattr(ex, "subcommand_parser", None) or self
            prog = parser.prog.replace(" [options]", "")
            sys.stderr.write(f"vitavla: error: {_short_parse_error(message)}\n"
                             f"run `{prog} --help` for the accepted options\n")
            self.exit(2)

    class VitaCLI(LightningCLI):
        """LightningCLI that maps ``strategy: deepspeed_stage_N`` to a CPU-capable DeepSpeed strategy when
        no GPU is present, so the same YAML trains on a laptop and on a GPU node; writes checkpoints
        atomically; and checks the output directories before any work."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parser_class", VitaArgumentParser)
            super().__init__(*args, **kwargs)

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
            from vitavla.checkpoint_io import AtomicCheckpointIO
            from vitavla.strategies import resolve_strategy

            config = dict(config)
            config["strategy"] = resolve_strategy(config.get("strategy", "auto"),
                                                  config.get("accelerator", "auto"))
            # A save interrupted by a kill or a full disk must keep the previous checkpoint readable.
            plugins = config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                config["plugins"] = [*plugins, AtomicCheckpointIO()]
            callbacks = [*callbacks, *_default_progress_bar(config, callbacks)]
            return super()._instantiate_trainer(config, callbacks)

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads --ckpt_path here first (for hyperparameters), before the trainer does.
            from vitavla.checkpoint_io import LIGHTNING_CKPT_HINT, UNREADABLE, read_error

            try:
                super()._parse_ckpt_path()
            except FileNotFoundError:
                raise
            except UNREADABLE as err:
                path = self.config[self.config.subcommand].get("ckpt_path")
                raise read_error(path, err, LIGHTNING_CKPT_HINT, True) from err

        def before_instantiate_classes(self) -> None:
            _use_policy_dir(self.config)

        def _run_subcommand(self, subcommand: str) -> None:
            _check_output_dirs(self.trainer)
            _attach_run_log(self.trainer, subcommand)
            super()._run_subcommand(subcommand)

    return VitaCLI


EXPORTED_MODULE = "vitavla.modules.exported.ExportedPolicyModule"


def _use_policy_dir(config) -> None:
    """``vitavla test|validate|predict --ckpt_path DIR`` with DIR from ``vitavla export``: the model is the
    exported policy (:class:`~vitavla.modules.exported.ExportedPolicyModule`), not the config's model
    section, whose frozen-weight paths a deployment machine may not have; Lightning gets no checkpoint."""
    from vitavla.serving.export import is_policy_dir

    sub = config.get("subcommand")
    if sub not in ("test", "validate", "predict"):
        return
    ckpt = config[sub].get("ckpt_path")
    if not is_policy_dir(ckpt):
        return
    from jsonargparse import Namespace

    config[sub]["model"] = Namespace(class_path=EXPORTED_MODULE, init_args=Namespace(path=str(ckpt)))
    config[sub]["ckpt_path"] = None


def _check_output_dirs(trainer) -> None:
    """Fail before any work, naming the key, when a directory the run writes into cannot be written."""
    from vitavla.errors import writable_dir

    dirs = {"trainer.default_root_dir": trainer.default_root_dir}
    if trainer.logger is not None and getattr(trainer.logger, "save_dir", None):
        dirs["trainer.logger.init_args.save_dir"] = trainer.logger.save_dir
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "dirpath", None):
            dirs["ModelCheckpoint.dirpath"] = cb.dirpath
    for key, path in dirs.items():
        if "://" not in str(path):  # remote storage: nothing to probe locally
            writable_dir(path, key)


def run_log_path(trainer, subcommand: str) -> Path:
    """``<save_dir>/vitavla-<subcommand>.log``: the logger's ``save_dir`` (else ``trainer.default_root_dir``),
    ``.rank<N>`` added on ranks other than 0."""
    root = getattr(trainer.logger, "save_dir", None) if trainer.logger is not None else None
    root = root or trainer.default_root_dir
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    return Path(root) / f"vitavla-{subcommand}{f'.rank{rank}' if rank else ''}.log"


def _attach_run_log(trainer, subcommand: str) -> None:
    """Third-party output of ``vitavla fit|test|...`` (held since the command started) into the run's log."""
    from vitavla import console

    router = console.active()
    if router is None or router.path is not None or "://" in str(trainer.default_root_dir):
        return
    path = router.attach(run_log_path(trainer, subcommand))
    print(f"third-party warnings and logs: {path} (--verbose shows them here)")


def _short_parse_error(message: str) -> str:
    """jsonargparse's message on one line: a union-validation report (``Parser key "model": Does not
    validate against any of the Union subtypes ...``) is cut to the problem with the given class_path."""
    lines = [line.strip() for line in message.strip().splitlines()]
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
             "- Expected a <class 'NoneType'>", "Given value")
    kept = [line.removeprefix("- ") for line in lines[1:] if line and not line.startswith(noise)]
    return " ".join([lines[0], *kept]) if lines else message


def _default_progress_bar(config: dict[str, Any], extra: list) -> list:
    """[StepProgressBar()] where Lightning would add its own rich bar (progress on, rich installed, no bar
    configured), else []: Lightning's labels a max_steps-bounded run "Epoch 2/-2"."""
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    from vitavla.progress import StepProgressBar

    configured = config.get("callbacks") or []
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    if (config.get("enable_progress_bar") is False or not _RICH_AVAILABLE
            or any(isinstance(c, ProgressBar) for c in [*configured, *extra])):
        return []
    return [StepProgressBar()]


def build_cli(args: list[str] | None = None, run: bool = True):
    """The parsed (and, with ``run``, executed) ``VitaCLI`` for ``args`` (None: the command line)."""
    from lightning.pytorch import LightningDataModule, LightningModule

    enable_attribute_docstrings()
    # Explicit args become the command line for the duration of the run, rather than a parameter next to an
    # emptied sys.argv: with trainer.devices=N outside torchrun/SLURM, Lightning's subprocess launcher starts
    # ranks 1..N-1 as `python <sys.argv[0]> <sys.argv[1:]>`, so sys.argv must hold the whole command.
    saved = sys.argv
    if args is not None:
        sys.argv = [sys.argv[0] if sys.argv else "vitavla", *map(str, args)]
    try:
        return vita_cli_class()(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=None,  # read from sys.argv above
            run=run,
        )
    finally:
        sys.argv = saved
