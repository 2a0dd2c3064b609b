"""Offline fixtures shared by the whole suite.

Environment variables are set at import, before anything imports axolotl, so that a
plain ``pytest`` can never hang on telemetry or try a hub.
"""

from __future__ import annotations

import os

from axolotl_mote.constants import OFFLINE_ENV  # noqa: E402 - no torch, no axolotl

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + ChatML BPE tokenizer (no markers: the plugin adds them)."""
    from axolotl_mote.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def aligncot():
    from axolotl_mote.templates import load_template

    return load_template("aligncot")


@pytest.fixture()
def tiny_tokenizer(tiny_model_dir, aligncot):
    """The tiny tokenizer with the aligncot markers added."""
    from transformers import AutoTokenizer

    from axolotl_mote.markers import add_marker_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    add_marker_tokens(tok, aligncot)
    return tok


@pytest.fixture(scope="session")
def tokenizer_for():
    """``tokenizer_for(template)``: a tiny tokenizer with the template's markers
    (cached)."""
    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.tiny import build_tiny_tokenizer

    cache: dict[tuple[str, ...], object] = {}

    def make(template):
        key = tuple(template.markers)
        if key not in cache:
            tok = build_tiny_tokenizer()
            add_marker_tokens(tok, template)
            cache[key] = tok
        return cache[key]

    return make


@pytest.fixture()
def fresh_tokenizer(aligncot):
    """A private tiny tokenizer with aligncot markers (tests may change
    padding_side)."""
    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    add_marker_tokens(tok, aligncot)
    return tok


@pytest.fixture()
def reset_plugins():
    """Axolotl's PluginManager is a process-wide singleton; empty it around a test.

    The instance is kept (modules such as axolotl.loaders.adapter hold a reference to
    it), only its registered plugins are cleared.
    """
    from axolotl.integrations.base import PluginManager

    manager = PluginManager.get_instance()
    manager.plugins.clear()
    yield manager
    manager.plugins.clear()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: on a shared 2-core machine extra threads only contend (5-20x
    slower).

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
