"""One rank of a DeepSpeed run that saves the tiny stage-2 module as Lightning's DeepSpeed strategy does.

``python -m tests.serving.deepspeed_writer OUT RANK WORLD PORT`` (one process per rank, all at once) writes
``OUT/zero2.ckpt`` and ``OUT/zero3.ckpt``, the stage-2 module of :func:`trained_module` (the same in every
process, seeded) under ZeRO stages 2 and 3, and ``OUT/zero2_align.ckpt``, the stage-1 module (tiny_align.yaml)
under ZeRO 2, each sharded over WORLD ranks. The save is the call Lightning's
``DeepSpeedStrategy.save_checkpoint`` makes: ``engine.save_checkpoint(path, client_state=<the Lightning
checkpoint without state_dict and optimizer states>, tag="checkpoint")``.
"""

import argparse
import os
import sys


def main(argv: list[str]) -> None:
    out, rank, world, port = argv[0], int(argv[1]), int(argv[2]), argv[3]
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import lightning
    import torch

    from tests.serving.conftest import EVAL_TINY, TINY_ALIGN, trained_module

    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    runs = (("zero2", EVAL_TINY, 2), ("zero3", EVAL_TINY, 3), ("zero2_align", TINY_ALIGN, 2))
    for name, config, stage in runs:
        module = trained_module(config)
        params = [p for p in module.parameters() if p.requires_grad]
        config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage}}
        engine, *_ = deepspeed.initialize(args=argparse.Namespace(device_rank=rank), config=config,
                                          model=module, model_parameters=params,
                                          optimizer=torch.optim.AdamW(params, lr=1e-3),
                                          dist_init_required=False)
        client = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__}
        module.on_save_checkpoint(client)  # adds the normalizer, as in a fit
        engine.save_checkpoint(os.path.join(out, f"{name}.ckpt"), client_state=client, tag="checkpoint")
        engine.destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
