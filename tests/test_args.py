"""The mote: block: parsing, cross-key rules with fix-it messages, and docs in sync."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from axolotl_mote.args import MoteArgs, MoteOptions
from tests.helpers.train import REPO

BASE = {"plugins": ["axolotl_mote.MotePlugin"], "adapter": "lora", "lora_r": 8}


def _validate(**overrides):
    return MoteArgs.model_validate({**BASE, **overrides})


def test_defaults_parse():
    args = _validate(mote={})
    assert args.mote.alpha == 0.5
    assert args.mote.shared_expert is True
    assert args.mote.prompt_routing == "random"
    assert args.mote.skip_positions == "shift"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"adapter": None}, "set `adapter: lora`"),
        ({"peft_use_dora": True}, "DoRA is not supported"),
        ({"lora_mlp_kernel": True}, "set lora_mlp_kernel: false"),
        ({"lora_qkv_kernel": True}, "lora_qkv_kernel"),
        ({"lora_o_kernel": True}, "lora_o_kernel"),
        ({"sequence_parallel_degree": 2}, "sequence/context parallelism"),
        ({"context_parallel_size": 2}, "sequence/context parallelism"),
        ({"lora_r": 0}, "must be an integer >= 1"),
        (
            {
                "attn_implementation": "xformers",
                "mote": {"step_skip_prob": 0.3},
            },
            "use attn_implementation: sdpa, eager, flex_attention or flash attention",
        ),
        ({"mote": {"alpha": 0.0}}, "mote.alpha must be in (0, 1]"),
        ({"mote": {"alpha": 1.5}}, "mote.alpha must be in (0, 1]"),
        ({"mote": {"step_skip_prob": 2}}, "mote.step_skip_prob must be in [0, 1]"),
        ({"mote": {"template": "nope"}}, "unknown template 'nope'"),
        (
            {"mote": {"prompt_routing": "bogus"}},
            "is not 'random', 'shared', 'expected' or a trained stage",
        ),
        (
            {"mote": {"prompt_routing": "shared", "shared_expert": False}},
            "prompt_routing: shared needs mote.shared_expert: true",
        ),
        ({"mote": {"skip_stages": ["nope"]}}, "mote.skip_stages: 'nope'"),
        ({"mote": {"unknown_key": 1}}, "unknown_key"),
    ],
)
def test_invalid_configs_name_the_fix(overrides, message):
    data = {**BASE, **overrides}
    data.setdefault("mote", {})
    with pytest.raises((ValidationError, ValueError)) as err:
        MoteArgs.model_validate(data)
    assert message in str(err.value)


def test_single_stage_template_without_shared_expert_is_rejected(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(
        "name: one\nanswer_stage: a\nstages:\n"
        "  - {name: a, key: a, start: '<|a|>', end: '<|/a|>', skippable: false}\n"
    )
    with pytest.raises(ValidationError, match="single trained stage"):
        _validate(mote={"template": str(path), "shared_expert": False})
    assert _validate(mote={"template": str(path)}).mote.template == str(path)


def test_rules_only_apply_with_the_plugin():
    # without the plugin listed, a mote block is inert and adapter rules don't fire
    MoteArgs.model_validate({"adapter": None, "mote": {}})


def test_every_field_is_described():
    for name, field in MoteOptions.model_fields.items():
        assert field.description and len(field.description) > 20, name


def test_configuration_doc_is_generated_from_args():
    from scripts.docgen import render

    assert (REPO / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: run `make docs`"
    )
