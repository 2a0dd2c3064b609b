"""The paper's 1–10 judge ratings: helpfulness (Help, and Harm-Help on harmful
prompts) and the quality of the analysis and guidance stages (its Appendix D).

Rubric data (``ratings:`` in the rubric YAML) names each rating, the stage it reads
(``answer``, or a stage name such as ``question_analysis``) and the judge prompt, in
MT-Bench's form: the judge ends with ``Rating: [[N]]``. A local judge model is
*constrained*: after ``Rating: [[`` only ``1]]`` … ``10]]`` may follow (greedy over
those tokens, :meth:`HFChatGenerator.choose`), so every rating parses. An endpoint judge
writes freely and its reply is parsed; a reply without a rating is counted as
``unrated``, never guessed.

Harmlessness is the harm judge's binary verdict (``harmless_rate``, the paper's Harm);
Harm-Help is the helpfulness rating on harmful-labelled prompts, which penalises safety
by plain refusal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from axolotl_mote.datagen.backends import TextGenerator, batch_seed

ANSWER = "answer"
SCALE = range(1, 11)
_BRACKETS = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_PLAIN = re.compile(r"rating\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass(frozen=True)
class RatingSpec:
    name: str
    stage: str  # "answer" or the stage name whose text is judged
    prompt: str  # placeholders: {question}, {response} (the answer), {text} (stage)
    harmful_name: str | None = None  # the same rating on harmful prompts (Harm-Help)


@dataclass
class RateInput:
    question: str
    answer: str
    stages: dict[str, str]  # stage name -> text


def load_ratings(rubric: dict[str, Any], names: Sequence[str]) -> list[RatingSpec]:
    """The rubric's ratings called ``names`` (``all``: every one), checked."""
    block = rubric.get("ratings") or {}
    if not block:
        raise ValueError(f"the rubric {rubric.get('name', '?')!r} has no `ratings:`")
    wanted = list(block) if list(names) == ["all"] else list(names)
    unknown = [n for n in wanted if n not in block]
    if unknown:
        raise ValueError(
            f"unknown rating(s) {unknown}; the rubric has {sorted(block)} (or `all`)"
        )
    specs = []
    for name in wanted:
        entry = block[name]
        missing = [k for k in ("stage", "prompt") if k not in entry]
        if missing:
            raise ValueError(f"rubric ratings.{name}: missing key(s) {missing}")
        specs.append(
            RatingSpec(name, entry["stage"], entry["prompt"], entry.get("harmful_name"))
        )
    return specs


def parse_rating(text: str | None) -> float | None:
    """``Rating: [[7]]`` (the last one) or ``Rating: 7``, on the 1–10 scale; else
    None."""
    if not text:
        return None
    found = _BRACKETS.findall(text) or _PLAIN.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if SCALE.start <= value <= SCALE.stop - 1 else None


class Rater:
    """Rates responses with a judge generator; one call per rating over all items."""

    def __init__(
        self,
        generator: TextGenerator,
        specs: Sequence[RatingSpec],
        *,
        max_new_tokens: int = 256,
        seed: int = 0,
    ) -> None:
        self.generator, self.specs = generator, list(specs)
        self.max_new_tokens, self.seed = max_new_tokens, seed

    def rate(self, items: Sequence[RateInput]) -> list[dict[str, float | None]]:
        """Per item, ``{rating name: value}``; a rating whose stage the reply did
        not run is absent (not applicable), an unparseable judge reply is None."""
        out: list[dict[str, float | None]] = [{} for _ in items]
        for spec in self.specs:
            idx, prompts = [], []
            for i, item in enumerate(items):
                text = (
                    item.answer if spec.stage == ANSWER else item.stages.get(spec.stage)
                )
                if not (text or "").strip():
                    if spec.stage == ANSWER:
                        out[i][spec.name] = float(SCALE.start)  # nothing was said
                    continue
                content = spec.prompt.format(
                    question=item.question, response=item.answer or "", text=text
                )
                idx.append(i)
                prompts.append([{"role": "user", "content": content}])
            for i, value in zip(idx, self._judge(spec, prompts)):
                out[i][spec.name] = value
        return out

    def _judge(self, spec: RatingSpec, prompts: list) -> list[float | None]:
        if not prompts:
            return []
        choose = getattr(self.generator, "choose", None)
        if choose is not None:
            options = [f"{n}]]" for n in SCALE]
            picks = choose(prompts, options, prefix="Rating: [[")
            return [float(SCALE[p]) for p in picks]
        replies = self.generator.complete(
            prompts,
            max_new_tokens=self.max_new_tokens,
            seed=batch_seed(self.seed, f"rating:{spec.name}"),
        )
        return [parse_rating(r) for r in replies]
