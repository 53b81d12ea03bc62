"""Trainable / frozen parameters of the paper configurations, built on the meta device (no memory, no weights).

    python benchmarks/param_counts.py

Student: InternViT-300M + MLP projector + Qwen2.5-7B (VITA-1.5's shape, hidden 3584) with the state encoder,
action token and 3-layer mapper; teacher decoder: Seer-Large (CALVIN, D=1024) or Seer (LIBERO, D=384).
The stage modules' gradient sets are asserted on tiny models in tests/vitavla/test_modules.py; this script
applies the same partition at full size.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teachers.seer import SeerConfig, SeerModel  # noqa: E402
from vitavla.backbones import InternVLBackbone, paper_internvl_config  # noqa: E402
from vitavla.modules.common import count_parameters, format_parameter_table  # noqa: E402
from vitavla.student import ActionMapper, VLAStudent  # noqa: E402


def paper_parts(preset: str, gripper_state: str, history: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(paper_internvl_config().to_dict()))
        with torch.device("meta"):
            backbone = InternVLBackbone(path=d, init="random", dtype="bfloat16")
            student = VLAStudent(backbone, gripper_state=gripper_state, max_steps=history)
            seer = SeerModel(SeerConfig.preset(preset))
            mapper = ActionMapper(student.hidden_size, seer.action_head.hidden_size)
    return {
        "vision": torch.nn.ModuleList(backbone.vision_modules()),
        "llm": backbone.language_model(),
        "state_encoder": student.state_encoder,
        "action_token": student.action_token,
        "action_mapper": mapper,
        "action_decoder": seer.action_head,
    }


def stage_counts(parts: dict, trainable: set[str]) -> dict[str, dict[str, int]]:
    for name, part in parts.items():
        part.requires_grad_(name in trainable)
    return count_parameters(parts)


STAGES = {
    "stage 1 (alignment)": {"state_encoder", "action_token", "action_mapper"},
    "stage 2 two_stage / only_finetune": {"llm", "state_encoder", "action_token", "action_mapper",
                                          "action_decoder"},
    "stage 2 freeze_vlm": {"state_encoder", "action_token", "action_mapper", "action_decoder"},
}


def main() -> None:
    for label, preset, grip, hist in (("CALVIN (Seer-Large teacher)", "seer_large_calvin", "binary", 10),
                                      ("LIBERO (Seer teacher)", "seer_libero", "width", 7)):
        parts = paper_parts(preset, grip, hist)
        for stage, trainable in STAGES.items():
            counts = stage_counts(parts, trainable)
            total = sum(c["trainable"] for c in counts.values())
            print(f"\n== {label}: {stage}: {total / 1e6:,.1f}M trainable")
            print(format_parameter_table(counts))


if __name__ == "__main__":
    main()
