"""A readable account of a template: its stages, experts and one rendered chain.

``axolotl-mote template NAME_OR_PATH`` prints it, so a user writing a template sees
exactly what training will see before training anything.
"""

from __future__ import annotations

from typing import Any

from axolotl_mote.constants import IGNORE_INDEX, PROMPT_STEP
from axolotl_mote.templates import PromptTemplate, StageMode


def example_record(template: PromptTemplate) -> dict[str, Any]:
    """A record with every stage present and a placeholder text in each."""
    record: dict[str, Any] = {"id": "example", "prompt": "An example question?"}
    for stage in template.stages:
        record[stage.key] = f"{stage.display_title} text."
    return record


def describe_template(
    template: PromptTemplate, tokenizer_dir: str | None = None
) -> str:
    """Stages, experts and an example chain with the step id of each segment."""
    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.data.schema import parse_chain
    from axolotl_mote.markers import add_marker_tokens

    lines = [f"template {template.name!r} ({template.source or 'in memory'})"]
    if template.description:
        lines.append(f"  {template.description.strip()}")
    lines.append("stages, in chain order:")
    trained = template.trained_stages
    for stage in template.stages:
        role = {
            StageMode.TRAIN: f"expert {trained.index(stage)}"
            if stage in trained
            else "",
            StageMode.CONTEXT: "no expert (routed like the prompt), no loss",
            StageMode.OMIT: "left out of training sequences",
        }[stage.mode]
        skip = "skippable" if stage.skippable else "required"
        lines.append(
            f"  {stage.name:<20} key={stage.key:<10} {stage.mode.value:<8} {skip:<10}"
            f" {stage.start} … {stage.end}   {role}"
        )
    shared = "+ 1 shared expert"
    lines.append(
        f"experts: {len(trained)} step experts {shared} per LoRA layer (PEFT rank "
        f"{len(trained) + 1} x lora_r); answer stage: {template.answer_stage}"
    )
    tokenizer = _tokenizer(tokenizer_dir)
    add_marker_tokens(tokenizer, template)
    formatter = ChainFormatter(template, tokenizer)
    chain = parse_chain(example_record(template), template)
    out = formatter.encode_batch([chain])
    ids, labels, steps = out["input_ids"][0], out["labels"][0], out["step_ids"][0]
    lines.append("example chain as training sees it (segments by step id):")
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or steps[i] != steps[start]:
            step = steps[start]
            name = "prompt" if step == PROMPT_STEP else trained[step].name
            loss = "loss" if labels[start] != IGNORE_INDEX else "no loss"
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            lines.append(f"  [{name}, step {step}, {loss}] {text!r}")
            start = i
    return "\n".join(lines)


def _tokenizer(tokenizer_dir: str | None) -> Any:
    if tokenizer_dir is None:
        from axolotl_mote.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
