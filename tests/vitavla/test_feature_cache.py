"""ImageFeatureCache and VLAStudent(cache_image_features=True): the frozen tower's outputs per image."""

import pytest
import torch

from tests.conftest import window
from tests.vitavla.conftest import student
from vitavla.feature_cache import ImageFeatureCache


def _frozen_student(**kw):
    s = student(cache_image_features=True, **kw)
    s.train()
    for m in s.backbone.vision_modules():
        m.requires_grad_(False).eval()
    return s


def _count_tower_images(s) -> list[int]:
    seen = []
    inner = s.backbone.embed_images
    s.backbone.embed_images = lambda images: (seen.append(len(images)), inner(images))[1]
    return seen


def test_cached_features_equal_the_tower_and_only_new_images_are_computed():
    torch.manual_seed(0)
    s = _frozen_student()
    plain = student()
    plain.load_state_dict(s.state_dict())
    w = window(num_steps=2)  # 2 episodes x 2 steps x 2 views = 8 images
    seen = _count_tower_images(s)
    with torch.no_grad():
        first, again = s(w), s(w)
        reference = plain.eval()(w)
    assert torch.allclose(first, reference, atol=1e-5) and torch.equal(first, again)
    assert seen == [8] and len(s.image_cache) == 8 and s.image_cache.hits == 8
    changed = window(num_steps=2)
    changed.images[0, 1, 0] = 255 - changed.images[0, 1, 0]  # one new image of the eight
    with torch.no_grad():
        out = s(changed)
    assert seen == [8, 1] and len(s.image_cache) == 9
    assert torch.allclose(out, plain(changed), atol=1e-5)


def test_no_cache_while_the_tower_trains_or_in_eval_mode_and_new_weights_clear_it():
    s = student(cache_image_features=True).train()  # vision parameters still trainable
    seen = _count_tower_images(s)
    w = window(num_steps=1)
    s(w).sum().backward()
    assert len(s.image_cache) == 0 and seen == [4]
    assert any(p.grad is not None for m in s.backbone.vision_modules() for p in m.parameters())
    f = _frozen_student()
    with torch.no_grad():
        f.eval()(w)  # rollouts: every frame is new, nothing is kept
        assert len(f.image_cache) == 0
        f.train()(w)  # train() puts the tower in train mode too (dropout): nothing is kept either
        assert len(f.image_cache) == 0
        for m in f.backbone.vision_modules():
            m.eval()
        f(w)
    assert len(f.image_cache) == 4
    f.load_state_dict(f.state_dict())
    assert len(f.image_cache) == 0
    f(w)
    f.double()
    assert len(f.image_cache) == 0


def test_cache_keys_are_the_pixels_and_the_shape_and_the_store_is_bounded():
    a = torch.zeros(3, 8, 8, dtype=torch.uint8)
    keys = ImageFeatureCache.keys(torch.stack([a, a.clone(), a + 1]))
    assert keys[0] == keys[1] != keys[2]
    assert ImageFeatureCache.keys(a[None])[0] != ImageFeatureCache.keys(torch.zeros(1, 3, 4, 16, dtype=torch.uint8))[0]
    cache = ImageFeatureCache(max_images=2)
    images = torch.arange(4, dtype=torch.uint8).reshape(4, 1, 1, 1).expand(4, 3, 2, 2)
    out = cache(images, lambda x: x.float().mean((1, 2, 3))[:, None, None])
    assert len(cache) == 2 and out.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="uint8"):
        cache(images.float(), lambda x: x)
