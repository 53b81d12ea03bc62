"""StreamingPolicy.step_many: independent episodes in one language-model call act as if stepped alone."""

import pytest
import torch

from teachers.base import ActionHead
from vitavla.backbones.internvl import InternVLBackbone
from vitavla.policy import VLAPolicy
from vitavla.streaming import Observation, StreamingPolicy
from vitavla.student import ActionMapper, VLAStudent


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    student = VLAStudent(InternVLBackbone(path="tiny", tokens_per_image=4, image_size=56), max_steps=3)
    return VLAPolicy(student, ActionMapper(student.hidden_size, 32), ActionHead(32)).eval()


def _obs(gen, instruction):
    return Observation(torch.randint(0, 256, (1, 2, 3, 56, 56), dtype=torch.uint8, generator=gen),
                       torch.randn(1, 7, generator=gen), [instruction])


@pytest.mark.parametrize("per_step", [True, False])
def test_step_many_equals_stepping_each_stream_alone(policy, per_step, one_thread):
    policy.student.instruction_per_step = per_step
    try:
        gen = torch.Generator().manual_seed(1)
        # Different instruction lengths (different token counts per step) and streams that start at different
        # times, so cache lengths differ and refills (max_steps=3) happen at different calls.
        prompts = ["pick up the red block", "open the drawer", "put the mug in the microwave and close it"]
        starts = [0, 1, 3]
        batched = [StreamingPolicy(policy) for _ in prompts]
        alone = [StreamingPolicy(policy) for _ in prompts]
        for t in range(7):
            active = [i for i, s in enumerate(starts) if t >= s]
            obs = {i: _obs(gen, prompts[i]) for i in active}
            got = StreamingPolicy.step_many([batched[i] for i in active], [obs[i] for i in active])
            for i, out in zip(active, got):
                want = alone[i].step(obs[i])
                torch.testing.assert_close(out.arm, want.arm, rtol=0, atol=1e-5)
                torch.testing.assert_close(out.gripper_logit, want.gripper_logit, rtol=0, atol=1e-5)
                assert batched[i].cached_tokens == alone[i].cached_tokens
                assert batched[i].refills == alone[i].refills
        assert max(s.refills for s in batched) >= 2
    finally:
        policy.student.instruction_per_step = True


def test_step_many_with_shared_image_embeddings_and_a_reset_stream(policy, one_thread):
    gen = torch.Generator().manual_seed(2)
    a, b = StreamingPolicy(policy), StreamingPolicy(policy)
    ref_a, ref_b = StreamingPolicy(policy), StreamingPolicy(policy)
    for t in range(4):
        if t == 2:
            b.reset()
            ref_b.reset()
        oa, ob = _obs(gen, "stack the blocks"), _obs(gen, "turn on the light bulb")
        emb = policy.student.embed_images(torch.cat([oa.images, ob.images])[:, None])
        out_a, out_b = StreamingPolicy.step_many([a, b], [oa, ob], [emb[:1], emb[1:]])
        torch.testing.assert_close(out_a.arm, ref_a.step(oa).arm, rtol=0, atol=1e-5)
        torch.testing.assert_close(out_b.arm, ref_b.step(ob).arm, rtol=0, atol=1e-5)
