"""``generate_chains``: Hugging Face ``generate`` with stage routing, per-row plans and
structured output.

>>> outs = generate_chains(model, tokenizer, ["How do I pick a lock?"],
...                        plan="adaptive", max_new_tokens=256)        # doctest: +SKIP
>>> outs[0].plan, outs[0].stages["safe_answer"]                         # doctest: +SKIP

Three pieces, one job each: the prompt is rendered exactly as in training
(``ChainFormatter.prompt_ids``); :class:`~.router.StageRouter` gives every fed token its
step id (installed as the model's automatic routing for the duration of the call,
``auto.py``); and
:class:`~.plan.StagePlanProcessor` keeps each row on its plan. The KV cache holds, for
every earlier token, what that token's own expert produced, exactly as a full
re-forward computes it, so cached and uncached decoding agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from axolotl_mote.constants import PROMPT_ROUTINGS
from axolotl_mote.generation.auto import install, routed_by
from axolotl_mote.generation.plan import (
    RowState,
    StagePlanProcessor,
    StageSpec,
    fit_plan,
)
from axolotl_mote.generation.router import StageRouter, start_marker_steps
from axolotl_mote.templates import PromptTemplate, load_template

Prompt = str | list[dict[str, str]] | dict[str, Any]
Plan = None | str | Sequence[str]


@dataclass
class ChainOutput:
    """One generated chain, stage by stage."""

    messages: list[dict[str, str]]
    plan: list[str]  # stages that ran, in order
    stages: dict[str, str]  # stage name -> text (markers stripped)
    tokens_per_stage: dict[str, int]  # stage name -> content tokens (markers excluded)
    answer: str | None  # text of the answer stage, None if it never ran
    finish_reason: str  # "answer_end" | "eos" | "length"
    fallback_used: bool = False  # the answer stage was opened by the fallback rule
    forced_ends: list[str] = field(default_factory=list)  # stages closed by a limit
    forced_plan: list[str] | None = None  # the requested plan (None: adaptive)
    dropped_stages: list[str] = field(default_factory=list)  # forced, not run: budget
    text: str = ""  # everything generated, markers included
    token_ids: list[int] = field(default_factory=list)  # generated (+ prefilled marker)
    step_ids: list[int] = field(default_factory=list)  # routed step id of each token
    logits: torch.Tensor | None = None  # [generated, vocab] raw logits (output_logits)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("logits")
        return out


def generate_chains(
    model: Any,
    tokenizer: Any,
    prompts: Prompt | Sequence[Prompt],
    *,
    plan: Plan | Sequence[Plan] = None,
    max_new_tokens: int = 256,
    max_stage_tokens: int | dict[str, int] | None = None,
    stop_after_answer: bool = True,
    fallback: str = "answer",
    answer_reserve: int | None = None,
    stage_reserve: int | None = None,
    template: PromptTemplate | str | Any = None,
    prompt_routing: str | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    use_cache: bool = True,
    do_sample: bool = False,
    output_logits: bool = False,
    progress: Any = None,
    **generate_kwargs: Any,
) -> list[ChainOutput]:
    """Generate reasoning chains from a MoTE model, one :class:`ChainOutput` per prompt.

    ``prompts``: a string (one user turn), a message list, or a record with ``messages``
    / ``prompt``; or a list of them. ``plan``: ``None``/``"adaptive"`` (the model picks
    its stages), ``"full"``, or stage names/keys such as ``["analysis", "answer"]`` /
    ``"analysis>answer"``; one for all rows or a list with one per prompt.
    ``max_stage_tokens``: content-token limit per stage (one int for all, or by stage
    name/key); at the limit the stage's end marker is forced. ``fallback="answer"``
    forces the answer stage open when a row would end, or keep fewer than
    ``answer_reserve`` tokens, without it; ``"none"`` leaves ``answer=None``. A forced
    plan keeps ``stage_reserve`` content tokens (default ``max(1, answer_reserve //
    4)``) and two markers for each of its later stages; stages that cannot fit the
    budget are dropped and listed in ``dropped_stages`` (``plan.py``).
    ``prompt_routing``: override the adapter's (``random``/``shared``/a stage).
    ``progress``: called with the number of prompts finished after every batch.
    Other keyword arguments (``temperature``, ``top_p``…) go to ``model.generate``;
    a ``logits_processor`` list runs after the plan rules.
    """
    from transformers import LogitsProcessorList

    from axolotl_mote.data.format import ChainFormatter
    from axolotl_mote.tuner.model import get_routing_state

    state = get_routing_state(model)
    tmpl = resolve_template(state, template)
    formatter = ChainFormatter(tmpl, tokenizer)
    spec = StageSpec.from_template(tmpl, formatter.marker_ids)
    if state.num_experts != len(spec.names):
        raise ValueError(
            f"template {tmpl.name!r} has {len(spec.names)} trained stages but the "
            "model "
            f"has {state.num_experts} experts; pass the adapter's template"
        )
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError(
            "MoTE generation supports num_beams=1 only (greedy or sampling)"
        )
    extra_processors = list(generate_kwargs.pop("logits_processor", None) or [])
    items = _as_list(prompts)
    plans = _per_row(plan, len(items), tmpl)
    limits = _stage_limits(max_stage_tokens, spec, tmpl)
    reserve = (
        answer_reserve if answer_reserve is not None else min(32, max_new_tokens // 4)
    )
    stage_reserve = max(1, reserve // 4) if stage_reserve is None else stage_reserve
    routing = state.prompt_routing
    if prompt_routing is not None:
        routing = (
            prompt_routing
            if prompt_routing in PROMPT_ROUTINGS
            else tmpl.trained_index(prompt_routing)
        )
    router = StageRouter(
        start_marker_steps(tmpl, formatter.marker_ids),
        routing,
        state.num_experts,
        seed=state.seed if seed is None else seed,
        shared_expert=state.shared_expert,
    )
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    )
    device = next(model.parameters()).device
    outputs: list[ChainOutput] = []
    for start in range(0, len(items), batch_size):
        chunk = range(start, min(start + batch_size, len(items)))
        messages = [_messages(items[i]) for i in chunk]
        rows = [RowState(plan=plans[i]) for i in chunk]
        for row in rows:
            if row.plan and fallback == "answer":  # the prefilled marker is free
                _kept, row.dropped = fit_plan(row.plan, max_new_tokens + 1, spec.answer,
                                             reserve, stage_reserve)  # fmt: skip
                row.fallback_used = bool(row.dropped)
        prefill_stage = [
            [s for s in r.plan if s not in r.dropped][0] if r.plan else None
            for r in rows
        ]
        prefill = [None if s is None else spec.start_ids[s] for s in prefill_stage]
        seqs = [
            formatter.prompt_ids(m) + ([p] if p is not None else [])
            for m, p in zip(messages, prefill)
        ]
        input_ids, attention_mask = _left_pad(seqs, pad_id, device)
        prompt_len = input_ids.shape[1]
        processor = StagePlanProcessor(
            spec,
            rows,
            prompt_len,
            max_new_tokens,
            limits,
            eos_ids,
            stop_after_answer=stop_after_answer,
            fallback=fallback,
            answer_reserve=reserve,
            keep_raw=output_logits,
            stage_reserve=stage_reserve,
        )
        for row, token in zip(rows, prefill):
            if token is not None:
                processor.consume(row, token, prefilled=True)
        router.begin()
        with routed_by(model, router), torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                logits_processor=LogitsProcessorList([processor, *extra_processors]),
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
                do_sample=do_sample,
                use_cache=use_cache,
                return_dict_in_generate=True,
                output_logits=output_logits,
                **generate_kwargs,
            )
        full_mask = torch.cat(
            [
                attention_mask,
                attention_mask.new_ones(
                    out.sequences.shape[0], out.sequences.shape[1] - prompt_len
                ),
            ],
            dim=1,
        )
        steps = router.step_ids(out.sequences, full_mask)  # [B, L] as a full re-forward
        logits = torch.stack(out.logits, dim=1) if output_logits else None  # [B, N, V]
        for j, _i in enumerate(chunk):
            first = prompt_len - (1 if prefill[j] is not None else 0)
            outputs.append(
                _parse(
                    out.sequences[j, first:].tolist(),
                    steps[j, first:].tolist(),
                    rows[j],
                    prefill[j] is not None,
                    messages[j],
                    spec,
                    tokenizer,
                    eos_ids,
                    None if logits is None else logits[j],
                    stop_after_answer,
                )
            )
        if progress is not None:
            progress(len(chunk))
    return outputs


def install_router(
    model: Any, tokenizer: Any, template: Any = None, seed: int | None = None
) -> StageRouter:
    """Route every later forward of ``model`` by the stage markers in its input.

    For a plain ``model.generate`` loop (``axolotl inference`` uses it through the
    plugin): no plan rules, the model alone decides its stages. Stays installed until
    ``axolotl_mote.generation.auto.uninstall(model)``.
    """
    from axolotl_mote.markers import marker_token_ids
    from axolotl_mote.tuner.model import get_routing_state

    state = get_routing_state(model)
    tmpl = resolve_template(state, template)
    router = StageRouter(
        start_marker_steps(tmpl, marker_token_ids(tmpl, tokenizer)),
        state.prompt,
        state.num_experts,
        seed=state.seed if seed is None else seed,
        shared_expert=state.shared_expert,
    )
    install(model, router)
    return router


def resolve_template(state: Any, template: Any) -> PromptTemplate:
    """The template to follow: the one given, else the adapter's own (kept on the
    routing state by ``attach_mote``)."""
    if template is None:
        if state.config is None:
            raise ValueError(
                "this MoTE model carries no template (attached without a MoteConfig); "
                "pass template= to generate_chains"
            )
        return state.config.prompt_template()
    if isinstance(template, PromptTemplate):
        return template
    if hasattr(template, "prompt_template"):
        return template.prompt_template()
    return load_template(template)


def split_plan(plan: Plan) -> None | str | list[str]:
    """A plan as written (``"analysis>answer"``, ``"a,b"``, a list) -> its parts.

    ``None``/``"adaptive"`` -> None; ``"full"`` stays; anything else -> stage names or
    record keys (not yet checked against a template: :func:`parse_plan` does that).
    """
    if plan is None or plan == "adaptive":
        return None
    if plan == "full":
        return "full"
    names = plan.replace(">", ",").split(",") if isinstance(plan, str) else list(plan)
    return [str(n).strip() for n in names if str(n).strip()]


def parse_plan(plan: Plan, template: PromptTemplate) -> list[int] | None:
    """``None``/"adaptive" -> None; "full" -> every stage; names/keys -> stage ids.

    Raises ``ValueError`` naming the plan and the fix for an unknown or untrained
    stage, a wrong order, or a plan without the answer stage at its end.
    """
    names = [s.name for s in template.trained_stages]
    parts = split_plan(plan)
    if parts is None:
        return None
    if parts == "full":
        return list(range(len(names)))
    try:
        ids = [template.trained_index(name) for name in parts]
    except ValueError as err:
        raise ValueError(f"plan {plan!r}: {err}") from None
    if ids != sorted(set(ids)):
        raise ValueError(
            f"plan {plan!r}: stages must be distinct and in template order "
            f"({' > '.join(names)})"
        )
    answer = template.trained_index(template.answer_stage)
    if answer not in ids:
        raise ValueError(
            f"plan {plan!r} lacks the answer stage {names[answer]!r}; every chain ends "
            "with it"
        )
    if ids[-1] != answer:
        raise ValueError(f"plan {plan!r}: the answer stage must come last")
    return ids


def _per_row(plan, n: int, template: PromptTemplate) -> list:
    """One plan for every row, or a list with one per row.

    A list is per-row when an element is ``None``, a list/tuple, ``"adaptive"``,
    ``"full"`` or a ``"a>b"`` string; a list of plain stage names is one plan.
    """

    def row_level(p) -> bool:
        return (
            p is None
            or isinstance(p, (list, tuple))
            or (
                isinstance(p, str)
                and (p in ("adaptive", "full") or ">" in p or "," in p)
            )
        )

    if isinstance(plan, (list, tuple)) and any(row_level(p) for p in plan):
        if len(plan) != n:
            raise ValueError(f"{len(plan)} plans for {n} prompts; give one per prompt")
        return [parse_plan(p, template) for p in plan]
    return [parse_plan(plan, template)] * n


def _stage_limits(limits, spec: StageSpec, template: PromptTemplate) -> dict[int, int]:
    if limits is None:
        return {}
    if isinstance(limits, int):
        return dict.fromkeys(range(len(spec.names)), limits)
    return {spec.index(name, template): int(v) for name, v in limits.items()}


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], dict) and "role" in prompts[0]:
        return [prompts]  # one message list
    return prompts


def _messages(item) -> list[dict[str, str]]:
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if isinstance(item, dict):
        if "messages" in item:
            return list(item["messages"])
        if "prompt" in item:
            return [{"role": "user", "content": item["prompt"]}]
        raise ValueError(
            f"a prompt record needs `messages` or `prompt`, got {sorted(item)}"
        )
    return list(item)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has no eos_token: set one so chains can end")
    return ids


def _left_pad(
    seqs: list[list[int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _parse(
    tokens,
    steps,
    row: RowState,
    prefilled: bool,
    messages,
    spec: StageSpec,
    tokenizer,
    eos_ids,
    logits,
    stop_after_answer: bool,
) -> ChainOutput:
    """Split a row's tokens (prefilled marker + generated) into stages."""
    start = {t: s for s, t in enumerate(spec.start_ids)}
    kept: list[int] = []
    content: dict[int, list[int]] = {}
    closed: set[int] = set()
    current, is_open, ended = None, False, False
    for token in tokens:
        kept.append(token)
        if token in start:
            current, is_open = start[token], True
            content.setdefault(current, [])
        elif is_open and token == spec.end_ids[current]:
            is_open = False
            closed.add(current)
        elif token in eos_ids:
            ended = True
            break
        elif is_open:
            content[current].append(token)
    order = list(content)
    stages = {
        spec.names[s]: tokenizer.decode(content[s], skip_special_tokens=True)
        for s in order
    }
    if spec.answer in closed and stop_after_answer:
        reason = "answer_end"
    else:
        reason = "eos" if ended else "length"
    n_generated = len(kept) - int(prefilled)
    return ChainOutput(
        messages=messages,
        plan=[spec.names[s] for s in order],
        stages=stages,
        tokens_per_stage={spec.names[s]: len(content[s]) for s in order},
        answer=stages.get(spec.names[spec.answer]),
        finish_reason=reason,
        fallback_used=row.fallback_used,
        forced_ends=[spec.names[s] for s in row.forced_ends],
        forced_plan=None if row.plan is None else [spec.names[s] for s in row.plan],
        dropped_stages=[spec.names[s] for s in row.dropped],
        text=tokenizer.decode(kept, skip_special_tokens=False),
        token_ids=kept,
        step_ids=steps[: len(kept)],
        logits=None if logits is None else logits[:n_generated],
    )
