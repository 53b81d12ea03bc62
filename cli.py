"""The ``vitavla`` command: LightningCLI (fit / validate / test / predict) plus a few extra subcommands.

    vitavla fit --config configs/align_calvin.yaml
    vitavla fit --config configs/finetune_calvin.yaml --model.init_from runs/align/.../last.ckpt
    vitavla quickstart            # both stages on tiny models, CPU, a few minutes
    vitavla data check PATH --format calvin|libero|aloha
    vitavla demos libero --suite libero_object --tasks 0 --episodes 20 --out data/demos --image-size 64

Every part (teacher, student backbone, datamodule, strategy) is chosen by ``class_path`` in YAML.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any

EXTRA_COMMANDS = {
    "quickstart": "vitavla.quickstart:main",
    "data": "datamodules.check:main",
    "demos": "vitavla.demos.libero_scripted:main",
}


def _enable_attribute_docstrings() -> None:
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
    child re-imports the ``vitavla`` console script (hence this module) before it unpickles its env, so a
    top-level Lightning import would add seconds to every worker start.
    """
    from lightning.pytorch.cli import LightningCLI

    class VitaCLI(LightningCLI):
        """LightningCLI that maps ``strategy: deepspeed_stage_N`` to a CPU-capable DeepSpeed strategy when
        no GPU is present, so the same YAML trains on a laptop and on a GPU node."""

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
            from vitavla.strategies import resolve_strategy

            config = dict(config)
            config["strategy"] = resolve_strategy(config.get("strategy", "auto"),
                                                  config.get("accelerator", "auto"))
            return super()._instantiate_trainer(config, callbacks)

    return VitaCLI


def build_cli(args: list[str] | None = None, run: bool = True):
    """The parsed (and, with ``run``, executed) ``VitaCLI`` for ``args`` (None: the command line)."""
    from lightning.pytorch import LightningDataModule, LightningModule

    _enable_attribute_docstrings()
    # Explicit args replace the command line; LightningCLI warns when it sees both.
    saved, sys.argv = sys.argv, (sys.argv[:1] if args is not None else sys.argv)
    try:
        return vita_cli_class()(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        import importlib

        module, func = EXTRA_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), func)(argv[1:])
        return
    try:
        build_cli(argv)
    except (ValueError, TypeError, FileNotFoundError) as e:
        root = _root_cause(e)
        if root is e and not isinstance(e, FileNotFoundError):
            raise
        # jsonargparse wraps construction errors in a union-validation report; show the cause we raised.
        sys.exit(f"vitavla: error: {type(root).__name__}: {root}")


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


if __name__ == "__main__":
    main()
