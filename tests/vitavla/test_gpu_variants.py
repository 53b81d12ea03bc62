"""The GPU variants (configs/gpu/*.yaml, layered over the paper configs) fit their GPUs by ``vitavla plan``, keep
the paper's global batch, and carry the plan's current figures in their header; ``vitavla plan`` layers repeated
``--config`` files as ``vitavla fit`` does. All on the meta device at the paper's size (~1 s a plan)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vitavla.errors import ConfigError
from vitavla.config_layers import load_configs, merge_configs
from vitavla.plan import GIB, main, make_plan, strategy_row

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
VARIANTS = sorted(p.stem for p in (CONFIGS / "gpu").glob("*.yaml"))
GPU_GIB = {"1x24gb": 24, "1x80gb": 80, "8x80gb": 80}
# What the plan does not count: the CUDA context (~0.5-1 GiB), DeepSpeed's buckets (Lightning's defaults:
# 2e8 elements each for reduce and all-gather), allocator fragmentation. A variant must leave this much free.
MARGIN_GIB = 2.0
# The paper's global batch (Table 5): 8 GPUs x batch per GPU x accumulate 4.
PAPER_GLOBAL_BATCH = {"align": 8 * 8 * 4, "finetune": 8 * 4 * 4}
CASES = [(v, bench) for v in VARIANTS for bench in ("calvin", "libero")]


def variant_plan(variant: str, bench: str):
    stage = variant.split("_")[1]
    paths = [CONFIGS / f"{stage}_{bench}.yaml", CONFIGS / "gpu" / f"{variant}.yaml"]
    return make_plan(load_configs(paths), backbone_config="paper", gpu_memory_gib=GPU_GIB[variant.split("_")[0]])


def test_the_variant_set():
    assert VARIANTS == [f"{g}_{s}" for g in ("1x24gb", "1x80gb", "8x80gb") for s in ("align", "finetune")]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    # The offload variants name their DeepSpeed JSON relative to the repository root, as Lightning reads it.
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("variant,bench", CASES)
def test_variant_fits_its_gpu_with_the_papers_global_batch(variant, bench):
    gpu, stage = variant.split("_")
    plan = variant_plan(variant, bench)
    assert plan.strategy_row is not None, f"{variant}: the plan has no row for trainer.strategy {plan.strategy}"
    total = plan.configured_total / GIB
    assert total + MARGIN_GIB <= GPU_GIB[gpu], (
        f"configs/gpu/{variant}.yaml over configs/{stage}_{bench}.yaml: {total:.2f} GiB per GPU + {MARGIN_GIB} GiB "
        f"margin > {GPU_GIB[gpu]} GiB")
    assert plan.global_batch == PAPER_GLOBAL_BATCH[stage]
    assert plan.precision == "bf16-mixed"
    if gpu == "1x24gb":
        assert plan.strategy_row == "ZeRO-2 + CPU offload" and plan.checkpointing_configured and plan.devices == 1
        assert (plan.lora is not None) == (stage == "finetune")  # stage 1's LLM is frozen: nothing to adapt
    elif gpu == "1x80gb":
        assert plan.devices == 1 and not plan.checkpointing_configured and plan.lora is None
        # The whole LLM trains in stage 2: ZeRO-2 alone would not fit one card, the offload does.
        assert plan.strategy_row == ("ZeRO-2 + CPU offload" if stage == "finetune" else "ZeRO-2")
        r = plan.rows["ZeRO-2"]
        assert (r["params"] + r["grads"] + r["optim"] + plan.activations.saved) / GIB > 80 or stage == "align"
    else:  # the paper's setting
        assert plan.strategy_row == "ZeRO-2" and plan.devices == 8 and not plan.checkpointing_configured
        assert plan.lora is None


@pytest.mark.parametrize("variant,bench", CASES)
def test_variant_header_and_docs_carry_the_plans_current_figures(variant, bench):
    stage = variant.split("_")[1]
    text = (CONFIGS / "gpu" / f"{variant}.yaml").read_text()
    m = re.search(rf"^#\s+{stage}_{bench}: ([\d.]+) GiB per GPU = model states ([\d.]+) \+ activations ([\d.]+); "
                  rf"host RAM ([\d.]+) GiB$", text, re.M)
    assert m, f"configs/gpu/{variant}.yaml: no '{stage}_{bench}: ... GiB per GPU' line in the header"
    plan = variant_plan(variant, bench)
    r = plan.rows[plan.strategy_row]
    states = r["params"] + r["grads"] + r["optim"]
    figures = [plan.configured_total, states, plan.configured_total - states, r["cpu"]]
    assert [float(x) for x in m.groups()] == pytest.approx([f / GIB for f in figures], abs=0.006), variant
    assert f"--config configs/gpu/{variant}.yaml" in text
    # docs/memory.md, "GPU variants": | config | devices | states | activations | total | host RAM | fits |
    docs = (ROOT / "docs" / "memory.md").read_text()
    row = re.search(rf"^\| {stage}_{bench} \+ {variant} \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                    rf"([\d.]+) \| yes \|$", docs, re.M)
    assert row, f"docs/memory.md: no GPU-variants row for {stage}_{bench} + {variant}"
    assert int(row[1]) == plan.devices
    assert [float(x) for x in row.groups()[1:]] == pytest.approx(
        [f / GIB for f in (states, plan.configured_total - states, plan.configured_total, r["cpu"])], abs=0.006)
    assert (f"vitavla plan --config configs/{stage}_{bench}.yaml --config configs/gpu/{variant}.yaml "
            f"--gpu_memory {GPU_GIB[variant.split('_')[0]]} --backbone_config paper") in docs


def test_plan_command_layers_two_configs(capsys):
    main(["--config", "configs/finetune_calvin.yaml", "--config", "configs/gpu/1x24gb_finetune.yaml",
          "--gpu_memory", "24", "--backbone_config", "paper"])
    out = capsys.readouterr().out
    assert "configs/finetune_calvin.yaml + configs/gpu/1x24gb_finetune.yaml (PolicyModule) on 1 GPU(s)" in out
    assert "llm                     40,370,176   7,070,619,136" in out  # rank-16 adapters, the LLM frozen
    assert re.search(r"this config: 17\.01 GiB per GPU \(ZeRO-2 \+ CPU offload, .*with checkpointing\), "
                     r"1\.08 GiB host RAM per GPU; fits 24 GiB: yes", out)
    assert "global batch: 128 windows per optimizer step = 1 GPU(s) x micro-batch 4 x accumulate_grad_batches 32" in out


def test_one_config_still_plans_and_devices_default_to_devices_times_nodes(tmp_path):
    over = tmp_path / "nodes.yaml"
    over.write_text("trainer: {devices: 8, num_nodes: 2, accumulate_grad_batches: 2}\n")
    plan = make_plan(load_configs([CONFIGS / "finetune_libero.yaml", over]), backbone_config="paper")
    assert plan.devices == 16 and plan.global_batch == 16 * 4 * 2 == 128
    # ZeRO-2 splits gradients and optimizer states over all 16 ranks of the two nodes.
    assert plan.rows["ZeRO-2"]["optim"] == pytest.approx(plan.rows["ZeRO-0 (DDP)"]["optim"] / 16)
    single = make_plan(load_configs([CONFIGS / "finetune_libero.yaml"]), backbone_config="paper")
    assert single.devices == 1 and single.strategy_row == "ZeRO-2"  # devices: auto counts as 1


# ---- layering ------------------------------------------------------------------------------------------------
def test_merge_configs_merges_mappings_and_replaces_lists_and_scalars():
    base = {"trainer": {"devices": "auto", "callbacks": [1, 2], "precision": "bf16-mixed"},
            "model": {"class_path": "vitavla.modules.PolicyModule", "init_args": {"lora": None, "init_mode": "x"}}}
    over = {"trainer": {"devices": 1, "callbacks": [3]},
            "model": {"init_args": {"lora": {"rank": 4}}}}
    out = merge_configs(base, over)
    assert out == {"trainer": {"devices": 1, "callbacks": [3], "precision": "bf16-mixed"},
                   "model": {"class_path": "vitavla.modules.PolicyModule",
                             "init_args": {"lora": {"rank": 4}, "init_mode": "x"}}}
    assert base["trainer"]["devices"] == "auto"  # inputs untouched


def test_merge_configs_class_swap_keeps_the_init_args_the_new_class_takes():
    base = {"teacher": {"class_path": "teachers.SeerTeacher",
                        "init_args": {"preset": "tiny", "checkpoint": "x.pth", "seed": 5}}}
    over = {"teacher": {"class_path": "teachers.TransformerTeacher", "init_args": {"hidden_size": 48}}}
    # As jsonargparse does for `vitavla fit --config A --config B` (checked against --print_config):
    # TransformerTeacher takes checkpoint and seed, not preset.
    assert merge_configs(base, over) == {"teacher": {"class_path": "teachers.TransformerTeacher",
                                                     "init_args": {"checkpoint": "x.pth", "seed": 5,
                                                                   "hidden_size": 48}}}


def _missing(parsed, value, key=""):
    """Where ``value`` (the plan's merged config) is not contained in ``parsed`` (jsonargparse's, which also
    holds every default): a key path, or None."""
    if isinstance(value, dict):
        if not isinstance(parsed, dict):
            return key
        for k, v in value.items():
            if k not in parsed:
                return f"{key}.{k}"
            where = _missing(parsed[k], v, f"{key}.{k}")
            if where:
                return where
        return None
    if isinstance(value, list):
        if not isinstance(parsed, list) or len(parsed) != len(value):
            return key
        return next((w for i, (p, v) in enumerate(zip(parsed, value)) if (w := _missing(p, v, f"{key}[{i}]"))), None)
    return None if parsed == value else f"{key} ({parsed!r} != {value!r})"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["1x24gb_finetune", "8x80gb_align"])
def test_merge_matches_what_vitavla_fit_parses(variant, capsys):
    """Every value of the plan's merged config is the one ``vitavla fit --print_config`` resolves (which
    also fills in defaults the plan does not need)."""
    from cli import build_cli

    stage = variant.split("_")[1]
    paths = [f"configs/{stage}_libero.yaml", f"configs/gpu/{variant}.yaml"]
    with pytest.raises(SystemExit) as e:
        build_cli(["fit", *[a for p in paths for a in ("--config", p)], "--print_config"], run=True)
    assert e.value.code in (0, None)
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert _missing(parsed, load_configs(paths)) is None


# ---- strategies and errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,row", [
    ("deepspeed_stage_2", "ZeRO-2"), ("deepspeed_stage_2_offload", "ZeRO-2 + CPU offload"),
    ("deepspeed_stage_3_offload", "ZeRO-3 + CPU offload"), ("deepspeed_cpu_stage_3", "ZeRO-3"),
    ("ddp", "ZeRO-0 (DDP)"), ("auto", "ZeRO-0 (DDP)"), (None, "ZeRO-0 (DDP)"),
    ("deepspeed_stage_1", None), ("fsdp", None),
    ({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 3}}, "ZeRO-3"),
    ({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy"}, "ZeRO-2"),  # Lightning's default stage
    ({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
      "init_args": {"stage": 2, "offload_optimizer": True}}, "ZeRO-2 + CPU offload"),
    ({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
      "init_args": {"config": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                     "offload_param": {"device": "cpu"}}}}}, "ZeRO-3 + CPU offload"),
    ({"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
      "init_args": {"config": "configs/gpu/deepspeed_zero2_offload.json"}}, "ZeRO-2 + CPU offload"),
])
def test_strategy_row(strategy, row):
    assert strategy_row(strategy) == row


def test_offload_json_is_lightnings_preset_plus_the_torch_optimizer_key():
    import json

    from lightning.pytorch.strategies import DeepSpeedStrategy

    ours = json.loads((CONFIGS / "gpu" / "deepspeed_zero2_offload.json").read_text())
    preset = DeepSpeedStrategy(stage=2, offload_optimizer=True).config
    assert ours.pop("zero_force_ds_cpu_optimizer") is False
    assert ours["zero_allow_untested_optimizer"] == preset["zero_allow_untested_optimizer"]
    zero, pz = ours["zero_optimization"], preset["zero_optimization"]
    assert zero.pop("offload_optimizer") == {k: pz["offload_optimizer"][k] for k in ("device", "pin_memory")}
    assert all(zero[k] == pz[k] for k in zero), zero


def test_bad_inputs_name_the_file_or_key(tmp_path, capsys):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n")
    with pytest.raises(SystemExit, match=rf"--config {re.escape(str(bad))}: expected a mapping"):
        main(["--config", "configs/finetune_calvin.yaml", "--config", str(bad), "--backbone_config", "paper"])
    with pytest.raises(SystemExit, match=r"--config nowhere.yaml: not found"):
        main(["--config", "configs/finetune_calvin.yaml", "--config", "nowhere.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: {devices: [\n")
    with pytest.raises(ConfigError, match=rf"--config {re.escape(str(broken))}: not valid YAML"):
        load_configs([broken])
    acc = tmp_path / "acc.yaml"
    acc.write_text("trainer: {accumulate_grad_batches: {0: 4}}\n")
    with pytest.raises(SystemExit, match=r"trainer.accumulate_grad_batches: the plan reads a fixed integer"):
        main(["--config", "configs/finetune_libero.yaml", "--config", str(acc), "--backbone_config", "paper"])
    ds = tmp_path / "ds.yaml"
    ds.write_text("trainer:\n  strategy:\n    class_path: lightning.pytorch.strategies.DeepSpeedStrategy\n"
                  "    init_args: {config: missing.json}\n")
    with pytest.raises(SystemExit, match=r"trainer.strategy.init_args.config: 'missing.json' is not a file"):
        main(["--config", "configs/finetune_libero.yaml", "--config", str(ds), "--backbone_config", "paper"])
    swap = tmp_path / "swap.yaml"
    swap.write_text("model:\n  init_args:\n    teacher: {class_path: teachers.NoSuchTeacher}\n")
    with pytest.raises(ConfigError, match=r"--config .*swap.yaml: model.init_args.teacher.class_path: cannot import"):
        load_configs([CONFIGS / "finetune_libero.yaml", swap])
