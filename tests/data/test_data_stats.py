"""Per-stage statistics: exact token counts and skip patterns.

First on hand-written ``step_ids`` rows (the numbers can be checked by eye), then on a
small dataset through the strategy, against counts derived from the tokenizer.
"""

from __future__ import annotations

import pytest

from axolotl_mote.data.stats import format_stats, stage_stats

QA, AG, SA = "question_analysis", "answer_guidance", "safe_answer"

ROWS = [
    [-2, -2, -2, 0, 0, 1, 1, 1, 2, 2],  # full chain
    [-2, -2, 2, 2, 2, -1, -1],  # answer only (padded)
    [-2, -2, 0, 0, 0, 0, 2, 2],  # analysis, answer
    [-2, 1, 1, 2],  # guidance, answer
    [-2, -2, -2, 2, 2],  # answer only
    [-1, -1, -2, 0, -2, -2, 2],  # left padding; a context stage (-2) mid-chain
]

EXPECTED = {
    "chains": 6,
    "tokens": {"prompt": 14, QA: 7, AG: 5, SA: 11, "padding": 4},
    "plans": {
        f"{QA} > {AG} > {SA}": 1,
        SA: 2,
        f"{QA} > {SA}": 2,
        f"{AG} > {SA}": 1,
    },
    "chains_skipping": {QA: 3, AG: 4, SA: 0},
}


def test_stage_stats_exact(aligncot):
    stats = stage_stats(ROWS, aligncot)
    assert stats == EXPECTED
    # plans are listed most common first
    assert list(stats["plans"].values()) == sorted(
        stats["plans"].values(), reverse=True
    )


def test_stage_stats_tensor_rows_and_empty(aligncot):
    """Rows may come as tensors (a torch-formatted dataset) or numpy arrays."""
    import numpy as np
    import torch

    assert stage_stats([np.array(r) for r in ROWS], aligncot) == EXPECTED
    assert stage_stats([torch.tensor(r) for r in ROWS], aligncot) == EXPECTED

    empty = stage_stats([], aligncot)
    assert empty == {
        "chains": 0,
        "tokens": {"prompt": 0, QA: 0, AG: 0, SA: 0, "padding": 0},
        "plans": {},
        "chains_skipping": {QA: 0, AG: 0, SA: 0},
    }


def test_format_stats_exact(aligncot):
    text = format_stats(stage_stats(ROWS, aligncot), "MoTE stage statistics (t)")
    # percentages over non-padding tokens: 14 + 7 + 5 + 11 = 37
    assert text.splitlines() == [
        "MoTE stage statistics (t): 6 chains",
        f"  tokens {'prompt':<20} {14:>10}  ( 37.8%)",
        f"  tokens {QA:<20} {7:>10}  ( 18.9%)",
        f"  tokens {AG:<20} {5:>10}  ( 13.5%)",
        f"  tokens {SA:<20} {11:>10}  ( 29.7%)",
        f"  tokens {'padding':<20} {4:>10}  ( 10.8%)",
        "  chains skipping question_analysis          3",
        "  chains skipping answer_guidance          4",
        "  chains skipping safe_answer           0",
        # most common first; ties in order of first appearance
        f"  plan {SA:<40} {2:>8}",
        f"  plan {QA + ' > ' + SA:<40} {2:>8}",
        f"  plan {QA + ' > ' + AG + ' > ' + SA:<40} {1:>8}",
        f"  plan {AG + ' > ' + SA:<40} {1:>8}",
    ]


def test_plan_solve_verify_stats(tokenizer_for):
    from axolotl_mote.templates import load_template

    template = load_template("plan_solve_verify")
    stats = stage_stats([[-2, 0, 1, 2], [-2, 2], [-2, 1, 1, 2, 2]], template)
    assert stats["tokens"] == {
        "prompt": 3,
        "plan": 1,
        "solve": 3,
        "verify": 4,
        "padding": 0,
    }
    assert stats["plans"] == {
        "plan > solve > verify": 1,
        "verify": 1,
        "solve > verify": 1,
    }
    assert stats["chains_skipping"] == {"plan": 2, "solve": 1, "verify": 0}


# --- through the strategy ----------------------------------------------------------
RECORDS = [
    {
        "id": "1",
        "prompt": "Pick a lock?",
        "analysis": "Risky request.",
        "guidance": "Decline politely.",
        "answer": "I can't help with that.",
        "check": "SAFE",
    },
    {"id": "2", "prompt": "Capital of France?", "answer": "Paris."},
    {
        "id": "3",
        "prompt": "Bake bread?",
        "analysis": "Harmless.",
        "answer": "Mix and bake.",
    },
    {
        "id": "4",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2 + 2?"},
        ],
        "answer": "4.",
    },
    {
        "id": "5",
        "prompt": "Recursion?",
        "guidance": "Explain simply.",
        "answer": "A function calling itself.",
    },
]


@pytest.mark.parametrize("variant", ["default", "check_train"])
def test_strategy_stats_match_the_tokens(variant, template_variant, tokenizer_for):
    from datasets import Dataset

    from axolotl_mote.integration.strategy import ChainDatasetStrategy
    from tests.helpers.chain_expect import conversation

    template = (
        template_variant("aligncot")
        if variant == "default"
        else template_variant("aligncot", check={"mode": "train"})
    )
    tok = tokenizer_for(template)
    keys = list(dict.fromkeys(k for r in RECORDS for k in r))
    data = Dataset.from_dict({k: [r.get(k) for r in RECORDS] for k in keys})
    strategy = ChainDatasetStrategy(template, tok, sequence_len=512)
    strategy.wrap_dataset(data)
    stats = strategy.last_stats

    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    suffix = n("<|im_end|>\n")
    prompt = sum(
        n(
            tok.apply_chat_template(
                conversation(r), tokenize=False, add_generation_prompt=True
            )
        )
        for r in RECORDS
    )
    trained = [s.key for s in template.trained_stages]
    expected_tokens = {"prompt": prompt, "padding": 0}
    for stage in template.trained_stages:
        expected_tokens[stage.name] = sum(
            n(r[stage.key]) + 2 for r in RECORDS if r.get(stage.key)
        )
    # the end of turn is counted with each chain's last trained stage
    for r in RECORDS:
        last = [k for k in trained if r.get(k)][-1]
        expected_tokens[template.stage(last).name] += suffix
    assert stats["tokens"] == expected_tokens
    assert stats["chains"] == 5 and stats["over_sequence_len"] == 0
    if variant == "default":
        assert stats["plans"] == {
            SA: 2,
            f"{QA} > {AG} > {SA}": 1,
            f"{QA} > {SA}": 1,
            f"{AG} > {SA}": 1,
        }
        assert stats["chains_skipping"] == {QA: 3, AG: 3, SA: 0}
    else:
        assert stats["plans"] == {
            SA: 2,
            f"{QA} > {AG} > {SA} > safety_check": 1,
            f"{QA} > {SA}": 1,
            f"{AG} > {SA}": 1,
        }
        assert stats["chains_skipping"] == {QA: 3, AG: 3, SA: 0, "safety_check": 4}
