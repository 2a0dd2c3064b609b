"""Every tuner test runs on one torch thread (tiny ops; see tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _tuner_threads(one_torch_thread):
    yield
