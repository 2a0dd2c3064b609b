"""Serving-test fixtures: a tiny saved MoTE adapter and the model loaded from it.

The model's forwards can be slowed down (``slow_model``) so that a request is still
running when a test disconnects, times out or fills the queue.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest

from tests.helpers.tiny import saved_aligncot_mote


@pytest.fixture(scope="package")
def saved(tiny_model_dir, tmp_path_factory):
    """(adapter dir, model, tokenizer): a tiny MoTE adapter. Marker rows are left as
    initialised, so stages hold some text before the model closes them."""
    return saved_aligncot_mote(
        tiny_model_dir,
        tmp_path_factory.mktemp("serving") / "adapter",
        prompt_routing="random",
        train_markers=False,
    )


@contextmanager
def slow_model(model, seconds: float):
    """Every forward of ``model`` sleeps ``seconds`` first (hooked on the input
    embeddings: ``generate`` calls the inner model, not the PEFT wrapper)."""
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_pre_hook(lambda *args: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()
