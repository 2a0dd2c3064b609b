"""An independent model of what the chain strategy must emit, for the data tests.

Built from the documented contract (docs/data_format.md), not from ``data/format.py``:
the conversation is rendered with ``add_generation_prompt=True``, each emitted stage is
``[start] + tokenize(text) + [end]``, the end of turn is the literal ChatML suffix.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100
PROMPT = -2
PAD = -1
CHATML_SUFFIX = "<|im_end|>\n"


def conversation(record: dict[str, Any]) -> list[dict[str, str]]:
    if record.get("messages") is not None:
        return [
            {"role": m["role"], "content": m["content"]} for m in record["messages"]
        ]
    return [{"role": "user", "content": record["prompt"]}]


def expected_rows(
    record: dict[str, Any],
    tok: Any,
    stages: list[tuple[str, str, str, int | None, bool]],
) -> dict[str, list[int]]:
    """Expected ``input_ids``/``labels``/``step_ids`` for one record.

    ``stages``: ``(key, start, end, step, trained)`` in template order; ``step=None``
    marks an omitted stage (never emitted).
    """
    prefix = tok.apply_chat_template(
        conversation(record), tokenize=False, add_generation_prompt=True
    )
    ids = tok(prefix, add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(ids)
    steps = [PROMPT] * len(ids)
    last_step, last_trained = PROMPT, False
    for key, start, end, step, trained in stages:
        if step is None or record.get(key) is None:
            continue
        seg = [
            tok.convert_tokens_to_ids(start),
            *tok(record[key], add_special_tokens=False)["input_ids"],
            tok.convert_tokens_to_ids(end),
        ]
        ids += seg
        labels += seg if trained else [IGNORE] * len(seg)
        steps += [step] * len(seg)
        last_step, last_trained = step, trained
    suffix = tok(CHATML_SUFFIX, add_special_tokens=False)["input_ids"]
    ids += suffix
    labels += suffix if last_trained else [IGNORE] * len(suffix)
    steps += [last_step] * len(suffix)
    return {"input_ids": ids, "labels": labels, "step_ids": steps}


def full_text(record: dict[str, Any], tok: Any, stages) -> str:
    """The whole training text: conversation + marker-wrapped stages + end of turn."""
    body = "".join(
        f"{start}{record[key]}{end}"
        for key, start, end, step, _ in stages
        if step is not None and record.get(key) is not None
    )
    return tok.apply_chat_template(
        [*conversation(record), {"role": "assistant", "content": body}], tokenize=False
    )


def stage_table(template) -> list[tuple[str, str, str, int | None, bool]]:
    """``(key, start, end, step, trained)`` per stage, step ids counted by hand."""
    out = []
    trained_index = 0
    for stage in template.stages:
        mode = stage.mode.value
        if mode == "train":
            out.append((stage.key, stage.start, stage.end, trained_index, True))
            trained_index += 1
        elif mode == "context":
            out.append((stage.key, stage.start, stage.end, PROMPT, False))
        else:
            out.append((stage.key, stage.start, stage.end, None, False))
    return out


def assert_aligned(row: dict[str, list[int]], tok: Any, template) -> None:
    """Structural invariants of one emitted row, checked token by token.

    * all columns have the same length;
    * the conversation (before the first marker) is step PROMPT, label -100 and holds
      no marker token;
    * every marker token opens/closes a stage whose tokens carry that stage's step id,
      labels = ids on trained stages (markers included) and -100 on context stages;
    * tokens after the last end marker (end of turn) carry the last stage's step/labels.
    """
    ids, labels, steps = row["input_ids"], row["labels"], row["step_ids"]
    assert len(ids) == len(labels) == len(steps) == len(row["attention_mask"])
    table = {s[1]: s for s in stage_table(template)}  # start marker -> stage
    start_ids = {tok.convert_tokens_to_ids(m): s for m, s in table.items()}
    end_ids = {tok.convert_tokens_to_ids(s[2]): s for s in table.values()}
    i, n = 0, len(ids)
    while i < n and ids[i] not in start_ids:
        assert ids[i] not in end_ids, f"end marker at {i} before any stage"
        assert steps[i] == PROMPT and labels[i] == IGNORE, f"prompt token {i}"
        i += 1
    assert i < n, "no stage in the row"
    last = None
    while i < n and ids[i] in start_ids:
        key, _, end, step, trained = start_ids[ids[i]]
        assert step is not None, f"omitted stage {key!r} was emitted"
        end_id = tok.convert_tokens_to_ids(end)
        j = ids.index(end_id, i)
        for k in range(i, j + 1):
            assert steps[k] == step, f"token {k} of stage {key!r}: step {steps[k]}"
            want = ids[k] if trained else IGNORE
            assert labels[k] == want, f"token {k} of stage {key!r}: label {labels[k]}"
            if i < k < j:
                assert ids[k] not in start_ids and ids[k] not in end_ids
        last = (step, trained)
        i = j + 1
    for k in range(i, n):
        assert ids[k] not in start_ids and ids[k] not in end_ids
        assert steps[k] == last[0], f"end-of-turn token {k}: step {steps[k]}"
        assert labels[k] == (ids[k] if last[1] else IGNORE)
