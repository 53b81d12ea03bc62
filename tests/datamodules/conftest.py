import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every datamodule test runs single-threaded (see tests/conftest.py: one_thread)."""
