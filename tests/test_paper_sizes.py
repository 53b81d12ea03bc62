"""The paper configurations at full size, on the meta device: stage 1 trains ~30M parameters at 7B."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "param_counts", Path(__file__).resolve().parents[1] / "benchmarks" / "param_counts.py")
param_counts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(param_counts)


@pytest.mark.parametrize("preset,grip,hist,d", [("seer_large_calvin", "binary", 10, 1024),
                                                 ("seer_libero", "width", 7, 384)])
def test_stage1_trains_about_30M_parameters_at_7B(preset, grip, hist, d):
    parts = param_counts.paper_parts(preset, grip, hist)
    assert parts["llm"].config.hidden_size == 3584
    stage1 = param_counts.stage_counts(parts, param_counts.STAGES["stage 1 (alignment)"])
    trainable = sum(c["trainable"] for c in stage1.values())
    # state encoder (6->H, 2->H, 2H->H) + action token + mapper (3584->d->d->d)
    h = 3584
    expected = (6 * h + h) + (2 * h + h) + (2 * h * h + h) + h + (h * d + d) + 2 * (d * d + d)
    assert trainable == expected and 25e6 < trainable < 35e6
    llm = stage1["llm"]["frozen"]
    assert 7.0e9 < llm < 7.1e9  # Qwen2.5-7B without lm_head
