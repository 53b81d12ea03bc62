import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation cost on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def libero_demo(tmp_path_factory):
    """One scripted LIBERO demo (libero_object task 0, 32 px), recorded once per session and shared by the
    simulator tests that need one; returns (GenConfig, TaskResult). Skips without LIBERO."""
    pytest.importorskip("libero.libero")
    from vitavla.demos.libero_scripted import GenConfig, generate

    cfg = GenConfig(suite="libero_object", tasks=(0,), episodes=1, max_attempts=2,
                    out=str(tmp_path_factory.mktemp("libero_demo")), image_size=32, max_steps=200,
                    settle_steps=1, progress=False)
    (res,) = generate(cfg, log=lambda msg: None)
    return cfg, res
