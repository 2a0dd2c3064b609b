"""Generate on prompt sets, score, and compute the metrics of one or more models.

A MoTE adapter generates through :func:`axolotl_mote.generation.generate_chains` (stage
routing by the emitted markers, the model picks its stages unless ``plan`` is forced); a
plain model (the base, for comparison) through the same chat backend as data
generation. The scored text is the **answer stage** — what a user would see; analysis
and guidance are reported as tokens and plans, not scored.

Metrics per set (``metrics_for``): ``harmless_rate`` on harmful-labelled prompts
(``robustness`` on a jailbreak set), ``compliance_rate`` on benign ones; ``unscored``
counts judge replies that could not be parsed (left out of the rates); plus mean tokens
per stage, the distribution of stage plans, missing answers and fallbacks.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from axolotl_mote.evaluation.prompts import PromptSet
from axolotl_mote.evaluation.ratings import RateInput, Rater, RatingSpec
from axolotl_mote.evaluation.scorers import ScoreInput, Scorer

NO_STAGES = "(no stages)"  # the plan of a plain model's reply


@dataclass
class ModelSpec:
    """A model to evaluate: ``base_model`` alone, or with a MoTE ``adapter``.

    ``load`` (tests, notebooks) returns ``(model, tokenizer)`` instead of loading paths;
    ``loading`` holds :func:`axolotl_mote.loading.load_model` options (dtype, device,
    device_map, load_in_4bit).
    """

    name: str
    base_model: str | None = None
    adapter: str | None = None
    load: Callable[[], tuple[Any, Any]] | None = None
    loading: dict[str, Any] = field(default_factory=dict)

    def materialise(self) -> tuple[Any, Any]:
        if self.load is not None:
            return self.load()
        from axolotl_mote.loading import load_model

        model, tok = load_model(self.base_model, self.adapter, **self.loading)
        return model.eval(), tok


@dataclass
class GenOptions:
    max_new_tokens: int = 256
    max_stage_tokens: int | dict[str, int] | None = None
    plan: str | None = None  # None/"adaptive", "full", or "analysis>answer"…
    prompt_routing: str | None = None  # None: the adapter's; random/expected/shared
    batch_size: int = 8
    seed: int = 0
    temperature: float | None = None  # None: greedy
    repetition_penalty: float | None = None  # None: off (HF's 1.0)


@dataclass
class Response:
    id: str
    set: str
    label: str
    question: str
    answer: str | None
    plan: list[str]
    tokens_per_stage: dict[str, int]
    total_tokens: int
    finish_reason: str | None = None
    fallback_used: bool = False
    text: str = ""
    score: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # stage name -> text
    ratings: dict[str, float | None] = field(default_factory=dict)  # judge, 1-10


def is_mote(model: Any) -> bool:
    from axolotl_mote.tuner.model import find_routing_state

    return find_routing_state(model) is not None


def respond(
    model: Any,
    tokenizer: Any,
    pset: PromptSet,
    opts: GenOptions,
    progress: Callable[[int], Any] | None = None,
) -> list[Response]:
    """Generate one response per prompt of ``pset``."""
    items = pset.items
    if is_mote(model):
        from axolotl_mote.generation import generate_chains

        sample = (
            {"do_sample": True, "temperature": opts.temperature}
            if opts.temperature
            else {}
        )
        if opts.repetition_penalty:
            sample["repetition_penalty"] = opts.repetition_penalty
        outs = generate_chains(
            model,
            tokenizer,
            [it.messages for it in items],
            plan=opts.plan,
            max_new_tokens=opts.max_new_tokens,
            max_stage_tokens=opts.max_stage_tokens,
            batch_size=opts.batch_size,
            seed=opts.seed,
            progress=progress,
            prompt_routing=opts.prompt_routing,
            **sample,
        )
        return [
            Response(
                it.id,
                pset.name,
                it.label,
                it.question,
                o.answer,
                list(o.plan),
                dict(o.tokens_per_stage),
                len(o.token_ids),
                o.finish_reason,
                o.fallback_used,
                o.text,
                stages=dict(o.stages),
            )
            for it, o in zip(items, outs)
        ]
    from axolotl_mote.datagen.backends import HFChatGenerator

    gen = HFChatGenerator(
        model,
        tokenizer,
        batch_size=opts.batch_size,
        temperature=opts.temperature,
        repetition_penalty=opts.repetition_penalty,
    )
    responses = []
    for start in range(0, len(items), opts.batch_size):
        chunk = items[start : start + opts.batch_size]
        texts = gen.complete(
            [it.messages for it in chunk],
            max_new_tokens=opts.max_new_tokens,
            seed=opts.seed + start,
        )
        for it, text, n in zip(chunk, texts, gen.last_token_counts):
            responses.append(
                Response(
                    it.id, pset.name, it.label, it.question, text, [], {}, n, text=text
                )
            )
        if progress is not None:
            progress(len(chunk))
    return responses


def score_responses(scorer: Scorer, responses: Sequence[Response]) -> None:
    scores = scorer.score(
        [ScoreInput(r.question, r.answer or "", r.label) for r in responses]
    )
    for response, score in zip(responses, scores):
        response.score = asdict(score)


def rate_responses(rater: Rater, responses: Sequence[Response]) -> None:
    ratings = rater.rate(
        [RateInput(r.question, r.answer or "", r.stages) for r in responses]
    )
    for response, values in zip(responses, ratings):
        response.ratings = values


def _rate(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def ratings_for(
    responses: Sequence[Response], specs: Sequence[RatingSpec] = ()
) -> dict[str, Any]:
    """Mean ratings: a rating with ``harmful_name`` is split by label (helpfulness on
    benign prompts; Harm-Help on harmful ones), the others averaged over the replies
    that ran their stage. ``unrated``: judge replies without a rating."""
    names = {n for r in responses for n in r.ratings}
    split = {s.name: s.harmful_name for s in specs if s.harmful_name}
    out: dict[str, Any] = {}
    for name in sorted(names):
        got = [(r.label, r.ratings[name]) for r in responses if name in r.ratings]
        values = [v for _, v in got if v is not None]
        if name in split:
            benign = [v for lab, v in got if v is not None and lab != "harmful"]
            harmful = [v for lab, v in got if v is not None and lab == "harmful"]
            if benign:
                out[name] = _mean(benign)
            if harmful:
                out[split[name]] = _mean(harmful)
        else:
            out[name] = _mean(values)
        unrated = len(got) - len(values)
        if unrated:
            out.setdefault("unrated", {})[name] = unrated
    return out


def by_plan(
    kind: str, responses: Sequence[Response], specs: Sequence[RatingSpec] = ()
) -> dict[str, Any]:
    """The set's rates and ratings for each stage plan the model chose."""
    groups: dict[str, list[Response]] = {}
    for r in responses:
        groups.setdefault(" > ".join(r.plan) if r.plan else NO_STAGES, []).append(r)
    out = {}
    for plan, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        entry = {k: v for k, v in _rates(kind, group).items() if v is not None}
        out[plan] = {"n": len(group), **entry, **ratings_for(group, specs)}
    return out


def metrics_for(
    kind: str, responses: Sequence[Response], specs: Sequence[RatingSpec] = ()
) -> dict[str, Any]:
    """Rates, ratings, tokens and plans of one set (responses already scored), and
    the rates and ratings per stage plan."""
    out: dict[str, Any] = {"kind": kind, "n": len(responses)}
    out.update(_rates(kind, responses))
    if any(r.ratings for r in responses):
        out["ratings"] = ratings_for(responses, specs)
    out.update(usage_for(responses))
    out["by_plan"] = by_plan(kind, responses, specs)
    return out


def wanted(label: str, score: dict[str, Any]) -> bool | None:
    """Whether one scored reply is what its prompt's label asks for: a harmful prompt
    answered harmlessly, a benign one complied with (None: unscored). The per-reply
    form of ``harmless_rate`` / ``robustness`` and ``compliance_rate``."""
    value = score.get("harmful" if label == "harmful" else "refused")
    return None if value is None else not value


def _rates(kind: str, responses: Sequence[Response]) -> dict[str, Any]:
    harm = [r for r in responses if r.label == "harmful"]
    benign = [r for r in responses if r.label == "benign"]
    harmless = [w for r in harm if (w := wanted(r.label, r.score)) is not None]
    complied = [w for r in benign if (w := wanted(r.label, r.score)) is not None]
    out: dict[str, Any] = {}
    if harm:
        out["robustness" if kind == "jailbreak" else "harmless_rate"] = _rate(harmless)
    if benign:
        out["compliance_rate"] = _rate(complied)
    out["unscored"] = len(harm) - len(harmless) + len(benign) - len(complied)
    return out


def usage_for(responses: Sequence[Response]) -> dict[str, Any]:
    """Mean tokens per stage (over replies that ran it), plan shares, missing
    answers."""
    per_stage: dict[str, list[int]] = {}
    for r in responses:
        for stage, n in r.tokens_per_stage.items():
            per_stage.setdefault(stage, []).append(n)
    plans = Counter(" > ".join(r.plan) if r.plan else NO_STAGES for r in responses)
    n = max(len(responses), 1)
    return {
        "mean_tokens_per_stage": {
            s: round(sum(v) / len(v), 2) for s, v in per_stage.items()
        },
        "mean_total_tokens": round(sum(r.total_tokens for r in responses) / n, 2),
        "stage_plans": dict(plans.most_common()),
        "no_answer": sum(1 for r in responses if not (r.answer or "").strip()),
        "fallback_used": sum(1 for r in responses if r.fallback_used),
    }


def evaluate_models(
    models: Sequence[ModelSpec],
    sets: Sequence[PromptSet],
    scorer: Scorer,
    out_dir: str | Path,
    opts: GenOptions | None = None,
    progress: bool = True,
    rater: Rater | None = None,
) -> dict[str, Any]:
    """Evaluate every model on every set; writes generations, results and the report.

    ``rater``: the judge's 1-10 ratings (helpfulness, Harm-Help, stage quality) on top
    of the scorer's rates."""
    from tqdm import tqdm

    from axolotl_mote.evaluation.report import write_report

    opts = opts or GenOptions()
    out_dir = Path(out_dir)
    (out_dir / "generations").mkdir(parents=True, exist_ok=True)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    results: dict[str, Any] = {
        "scorer": {"name": scorer.name, "approximate": scorer.approximate},
        "ratings": [s.name for s in rater.specs] if rater is not None else [],
        "generation": asdict(opts),
        "sets": {
            s.name: {"kind": s.kind, "path": s.path, "n": len(s.items)} for s in sets
        },
        "models": {},
    }
    total = sum(len(s.items) for s in sets)
    for spec in models:
        model, tokenizer = spec.materialise()
        entry: dict[str, Any] = {
            "base_model": spec.base_model,
            "adapter": spec.adapter,
            "mote": is_mote(model),
            "sets": {},
        }
        everything: list[Response] = []
        with tqdm(
            total=total,
            desc=f"evaluate {spec.name}",
            unit="prompt",
            disable=not progress,
        ) as bar:
            for pset in sets:
                responses = respond(model, tokenizer, pset, opts, progress=bar.update)
                score_responses(scorer, responses)
                if rater is not None:
                    rate_responses(rater, responses)
                specs = rater.specs if rater is not None else ()
                entry["sets"][pset.name] = metrics_for(pset.kind, responses, specs)
                everything += responses
        entry["overall"] = usage_for(everything)
        results["models"][spec.name] = entry
        with open(
            out_dir / "generations" / f"{_safe(spec.name)}.jsonl", "w", encoding="utf-8"
        ) as handle:
            for r in everything:
                handle.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
        del model
        gc.collect()
    write_report(results, out_dir)
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
