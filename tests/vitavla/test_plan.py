"""``vitavla plan`` against measurements: the activations of real CPU training steps, and
activation checkpointing (same gradients, smaller plan)."""

from __future__ import annotations

import pytest
import torch

from tests.vitavla.conftest import BATCH, config, measured_and_planned, saved_tensor_bytes, small_backbone_dir
from vitavla.plan import format_plan, make_plan


@pytest.mark.parametrize("scale", ["tiny", "small"])
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_figure_is_within_20_percent_of_the_measured_saved_tensors(scale, stage, checkpointing,
                                                                               tmp_path, one_thread):
    path = "tiny" if scale == "tiny" else small_backbone_dir(tmp_path)
    module, batch, plan = measured_and_planned(config(stage, path, checkpointing))
    measured = saved_tensor_bytes(module, batch)
    if checkpointing:
        # Non-reentrant checkpointing holds the blocks' non-differentiable inputs (the additive mask, B x 1 x
        # L x L) by reference for the recomputation, not through saved-tensor hooks: alive, but unseen above.
        measured += BATCH * plan.tokens["total"] ** 2 * 4
    acts = plan.activations
    predicted = acts.saved_checkpointed if checkpointing else acts.saved
    print(f"{scale} {stage} checkpointing={checkpointing}: predicted {predicted:,.0f} B, measured {measured:,} B")
    assert abs(predicted - measured) <= 0.2 * measured
    assert plan.llm_trainable == (stage == "stage2")


def trainable_grads(module, batch) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_checkpointing_gives_the_same_gradients_and_a_smaller_plan(stage, one_thread):
    grads = {}
    plans = {}
    for ckpt in (False, True):
        module, batch, plan = measured_and_planned(config(stage, checkpointing=ckpt))
        llm = module.student_module().backbone.language_model()
        assert llm.gradient_checkpointing == ckpt and plan.checkpointing_configured == ckpt
        grads[ckpt], plans[ckpt] = trainable_grads(module, batch), plan
    assert grads[False].keys() == grads[True].keys()
    llm_keys = [k for k in grads[False] if ".language_model." in k]
    assert bool(llm_keys) == (stage == "stage2")  # stage 1 trains only what sits around the frozen LLM
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-5, msg=name)
    # The plan's checkpointed figure is what checkpointing keeps (one input per block) plus one block.
    a = plans[True].activations
    assert a.peak_checkpointed < a.saved
    assert a.saved_checkpointed == pytest.approx(a.layers * BATCH * a.checkpoint / BATCH + a.shared)


def test_paper_config_plan_on_the_meta_device(capsys):
    from vitavla.plan import main

    main(["--config", "configs/finetune_calvin.yaml", "--devices", "8", "--gpu_memory", "80",
          "--backbone_config", "paper"])
    out = capsys.readouterr().out
    assert "7,070,619,136" in out  # Qwen2.5-7B without lm_head, all trainable in stage 2
    assert "ZeRO-3 + CPU offload" in out and "fits 80 GiB" in out


def test_missing_backbone_names_the_key_and_the_way_out():
    from vitavla.plan import main

    with pytest.raises(SystemExit, match=r"backbone.init_args.path.*--backbone_config paper"):
        main(["--config", "configs/finetune_calvin.yaml"])


def test_format_plan_tiny_in_mib():
    plan = make_plan(config("stage2"), devices=2, gpu_memory_gib=24)
    text = format_plan(plan, "tiny")
    assert "MiB per GPU" in text and "on 2 GPU(s)" in text
    # ZeRO-2 halves gradients and optimizer states on 2 devices, keeps weights whole.
    z0, z2 = plan.rows["ZeRO-0 (DDP)"], plan.rows["ZeRO-2"]
    assert z2["params"] == z0["params"] and z2["optim"] == z0["optim"] / 2 and z2["grads"] == z0["grads"] / 2
