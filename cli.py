"""The ``vitavla`` command: LightningCLI (fit / validate / test / predict) plus a few extra subcommands.

    vitavla fit --config configs/align_calvin.yaml
    vitavla fit --config configs/finetune_calvin.yaml --model.init_from runs/align/.../last.ckpt
    vitavla quickstart            # both stages on tiny models, CPU, a few minutes
    vitavla evidence              # the quickstart over seeds and tasks, with learning curves (docs/quickstart.md)
    vitavla data check PATH --format calvin|libero|aloha|lerobot
    vitavla data convert PATH --format libero --to lerobot --out DIR
    vitavla demos libero --suite libero_object --tasks 0 --episodes 20 --out data/demos --image-size 64
    vitavla export --config configs/eval_tiny.yaml --ckpt_path last.ckpt --out policies/tiny
    vitavla test --config configs/eval_tiny.yaml --ckpt_path policies/tiny   # an exported directory
    vitavla serve policies/tiny --port 8000   # openpi websocket protocol (docs/deploy.md)
    vitavla plan --config configs/finetune_calvin.yaml --devices 8 --backbone_config paper   # memory per GPU

Third-party warnings and log records (Lightning, jsonargparse, transformers, robosuite) go to a log file of
the run (``<save_dir>/vitavla-<subcommand>.log``, ``<out>/quickstart.log``); ``--verbose`` leaves them on the
console instead (:mod:`vitavla.console`).

Every part (teacher, student backbone, datamodule, strategy) is chosen by ``class_path`` in YAML.
"""

from __future__ import annotations

import sys

from vitavla.lightning_cli import (  # noqa: F401 - the public names `from cli import ...` has always given
    EXPORTED_MODULE,
    build_cli,
    enable_attribute_docstrings,
    run_log_path,
    vita_cli_class,
)

EXTRA_COMMANDS = {
    "quickstart": "vitavla.quickstart:main",
    "evidence": "vitavla.evidence:main",
    "data": "datamodules.check:main",
    "demos": "vitavla.demos.libero_scripted:main",
    "export": "vitavla.serving.export:main",
    "plan": "vitavla.plan:main",
    "serve": "vitavla.serving.server:main",
}


def main(argv: list[str] | None = None) -> None:
    from vitavla import console

    if argv is None:  # the process's command: __del__ errors at interpreter exit go to the run's log too
        console.route_unraisable_at_exit()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        import importlib

        module, func = EXTRA_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), func)(argv[1:])
        return
    # --verbose (anywhere): third-party warnings and logs on the console rather than in the run's log.
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        with console.routed(verbose=verbose):
            build_cli(argv)
    except Exception as e:
        message = _user_message(e)
        if message is None:
            raise
        sys.exit(f"vitavla: error: {message}")


def _user_message(e: BaseException) -> str | None:
    """The one line ``vitavla`` prints for ``e``, or None to show the traceback (a bug, not bad input).

    Our checks raise :class:`~vitavla.errors.UserFacingError`, whose message names the file or key; it may
    arrive wrapped (jsonargparse's union-validation report) or wrap a library error (torch.load's), so the
    outermost one in the chain wins. Other errors that jsonargparse wrapped during construction show their
    root cause; a missing file shows its message.
    """
    from vitavla.errors import UserFacingError

    cause = e
    while cause is not None:
        if isinstance(cause, UserFacingError):
            return f"{type(cause).__name__}: {cause}"
        cause = cause.__cause__
    if not isinstance(e, (ValueError, TypeError, FileNotFoundError)):
        return None
    root = _root_cause(e)
    if root is e and not isinstance(e, FileNotFoundError):
        return None
    return f"{type(root).__name__}: {root}"


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


if __name__ == "__main__":
    main()
