"""Incompatible settings are refused with the key and the fix, at every level.

* ``MoteArgs`` (the ``mote:`` block and Axolotl keys, at config validation);
* ``MoteConfig`` (the tuner's own config, for library users without Axolotl);
* ``attach_mote`` / ``check_supported`` (the PEFT model actually built).
"""

from __future__ import annotations

import pytest

from axolotl_mote.args import MoteArgs
from axolotl_mote.tuner.config import MoteConfig
from axolotl_mote.tuner.model import attach_mote
from tests.helpers.tiny import (
    TARGETS,
    lora_config,
    mote_config,
    tiny_llama,
)

BASE = {
    "plugins": ["axolotl_mote.MotePlugin"],
    "adapter": "lora",
    "lora_r": 8,
    "mote": {},
}

# (case id, overrides of an Axolotl config, substrings: the key ... and the fix)
ARGS_CASES = [
    ("dora", {"peft_use_dora": True}, ["peft_use_dora", "DoRA", "remove it"]),
    (
        "mlp-kernel",
        {"lora_mlp_kernel": True},
        [
            "lora_mlp_kernel: true",
            "bypass MoTE's routing",
            "set lora_mlp_kernel: false",
        ],
    ),
    ("qkv-kernel", {"lora_qkv_kernel": True}, ["set lora_qkv_kernel: false"]),
    ("o-kernel", {"lora_o_kernel": True}, ["set lora_o_kernel: false"]),
    (
        "sequence-parallel",
        {"sequence_parallel_degree": 2},
        ["sequence_parallel_degree: 2", "sequence/context parallelism", "remove it"],
    ),
    (
        "context-parallel",
        {"context_parallel_size": 4},
        ["context_parallel_size: 4", "remove it"],
    ),
    ("rank-0", {"lora_r": 0}, ["lora_r", "integer >= 1", "got 0"]),
    ("rank-negative", {"lora_r": -4}, ["lora_r", "integer >= 1", "got -4"]),
    ("rank-float", {"lora_r": 2.5}, ["lora_r", "integer >= 1", "got 2.5"]),
    ("alpha-0", {"mote": {"alpha": 0.0}}, ["mote.alpha", "(0, 1]", "got 0.0", "0.5"]),
    ("alpha-negative", {"mote": {"alpha": -0.5}}, ["mote.alpha", "(0, 1]"]),
    ("alpha-above-1", {"mote": {"alpha": 1.01}}, ["mote.alpha", "(0, 1]", "1.01"]),
    ("not-lora", {"adapter": None}, ["adapter: None", "set `adapter: lora`"]),
]


@pytest.mark.parametrize(
    "overrides, needles", [c[1:] for c in ARGS_CASES], ids=[c[0] for c in ARGS_CASES]
)
def test_axolotl_config_errors_name_key_and_fix(overrides, needles):
    with pytest.raises(ValueError) as err:
        MoteArgs.model_validate({**BASE, **overrides})
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {err.value}"


def test_valid_extremes_pass():
    MoteArgs.model_validate({**BASE, "lora_r": 1, "mote": {"alpha": 1.0}})
    MoteArgs.model_validate(
        {**BASE, "sequence_parallel_degree": 1, "lora_mlp_kernel": False}
    )


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as err:
        MoteArgs.model_validate(
            {
                **BASE,
                "peft_use_dora": True,
                "lora_o_kernel": True,
                "lora_r": 0,
                "context_parallel_size": 2,
            }
        )
    text = str(err.value)
    for key in ("peft_use_dora", "lora_o_kernel", "lora_r", "context_parallel_size"):
        assert key in text


def test_single_stage_template_without_shared_expert(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(
        "name: one\nanswer_stage: a\nstages:\n"
        "  - {name: a, key: a, start: '<|a|>', end: '<|/a|>', skippable: false}\n"
    )
    with pytest.raises(ValueError) as err:
        MoteArgs.model_validate(
            {**BASE, "mote": {"template": str(path), "shared_expert": False}}
        )
    for needle in (
        "single trained stage",
        "mote.shared_expert is false",
        "enable the shared expert",
    ):
        assert needle in str(err.value)


# (case id, MoteConfig kwargs, substrings: the field ... and the fix)
CONFIG_CASES = [
    ("no-stages", {"stage_names": []}, ["stage_names", "at least one trained stage"]),
    ("rank-0", {"expert_rank": 0}, ["expert_rank", "lora_r", ">= 1", "got 0"]),
    ("rank-text", {"expert_rank": "8"}, ["expert_rank", "integer", "got '8'"]),
    ("rank-negative", {"expert_rank": -2}, ["expert_rank", ">= 1", "got -2"]),
    ("alpha-0", {"alpha": 0.0}, ["alpha", "(0, 1]", "got 0.0", "mote.alpha"]),
    ("alpha-1.5", {"alpha": 1.5}, ["alpha", "(0, 1]", "got 1.5"]),
    (
        "single-stage-no-shared",
        {"stage_names": ["answer"], "shared_expert": False},
        ["single trained stage", "shared_expert", "plain LoRA", "enable the shared"],
    ),
    (
        "prompt-shared-no-shared",
        {"shared_expert": False, "prompt_routing": "shared"},
        ["prompt_routing: shared", "shared_expert: true"],
    ),
    (
        "prompt-unknown-stage",
        {"prompt_routing": "verify"},
        ["prompt_routing: 'verify'", "'random', 'shared', 'expected' or a trained"],
    ),
]


@pytest.mark.parametrize(
    "kwargs, needles", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_mote_config_errors_name_field_and_fix(kwargs, needles):
    with pytest.raises(ValueError) as err:
        mote_config(**kwargs)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {err.value}"


def test_single_stage_with_shared_expert_is_fine():
    config = MoteConfig(stage_names=["answer"], expert_rank=2)
    assert config.n_blocks == 2 and config.peft_rank == 4


def _peft(config, **lora_overrides):
    from peft import LoraConfig, get_peft_model

    kwargs = lora_config(config).to_dict()
    keep = (
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
    )
    kwargs = {k: kwargs[k] for k in keep}
    kwargs.update(lora_overrides)
    return get_peft_model(tiny_llama(), LoraConfig(**kwargs))


# (case id, LoraConfig overrides, exception type, substrings)
PEFT_CASES = [
    (
        "dora",
        {"use_dora": True},
        ValueError,
        ["DoRA is not supported", "peft_use_dora"],
    ),
    (
        "embedding-lora",
        {"target_modules": ["embed_tokens", *TARGETS]},
        TypeError,
        ["embed_tokens", "embeddings is not supported", "target linear layers only"],
    ),
    (
        "rank-not-blocks",
        {"rank_pattern": {}, "alpha_pattern": {}, "r": 6},
        ValueError,
        ["rank 6 is not a multiple of the 4 MoTE blocks", "MoteConfig.peft_kwargs()"],
    ),
    (
        "rank-of-other-r",
        {"rank_pattern": {".*": 8}},
        ValueError,
        ["expert rank 2 != mote expert_rank 4", "MoteConfig.peft_kwargs()"],
    ),
    (
        "no-patterns-r8",
        {"rank_pattern": {}, "alpha_pattern": {}, "r": 8},
        ValueError,
        ["expert rank 2 != mote expert_rank 4", "MoteConfig.peft_kwargs()"],
    ),
]


@pytest.mark.parametrize(
    "overrides, exc, needles",
    [c[1:] for c in PEFT_CASES],
    ids=[c[0] for c in PEFT_CASES],
)
def test_attach_refuses_unsupported_peft_layers(overrides, exc, needles):
    config = mote_config()
    model = _peft(config, **overrides)
    with pytest.raises(exc) as err:
        attach_mote(model, config)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {err.value}"


def test_attach_needs_lora_layers():
    with pytest.raises(ValueError, match="no PEFT LoRA layers.*lora_target_modules"):
        attach_mote(tiny_llama(), mote_config())


def test_attach_to_a_proper_model_routes_every_target():
    config = mote_config()
    model = _peft(config)
    state = attach_mote(model, config)
    variants = [h.variant for h in state.handles if hasattr(h, "variant")]
    assert len(variants) == 2 * len(TARGETS)
    assert all(v.state is state for v in variants)
    assert state.config is config
    assert state.n_blocks == 4 and not state.is_set
