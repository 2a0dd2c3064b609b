"""The paper's check-then-extend rule, batched over many questions.

For every question (MoTE §1, Liu et al. 2025), with the stage prompts of the template's
``generation:`` block:

1. answer directly (``answer``), then self-check (``check``);
2. if the check says unsafe: write an analysis (``analysis``), answer again with it
   (``answer_with_analysis``), check;
3. if still unsafe: write guidance (``guidance``), answer with both
   (``answer_with_guidance``), check;
4. if even the full chain is unsafe, ``on_fail`` decides: ``keep`` (write it like any
   chain), ``mark`` (write it with ``meta.needs_review: true``) or ``drop`` (reject it).

The rounds follow the template: round *k* adds the *k*-th trained stage before the
answer stage, so a template with other stage names works if its ``generation:`` block
has a prompt per stage key and ``answer_with_<key>`` per added stage. Every call is one
batch over the questions still open. Each verdict (and the check's text) is recorded in
``meta.datagen``. Malformed output (empty text, a stage marker inside text, a check
whose verdict cannot be parsed) ends that question as ``malformed``: it is counted and
written to the rejects file, never kept.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from axolotl_mote.data.schema import ChainRecordError, parse_chain
from axolotl_mote.datagen.backends import TextGenerator, batch_seed, parse_verdict
from axolotl_mote.templates import PromptTemplate, StageMode

ON_FAIL = ("keep", "mark", "drop")
SAFE, UNSAFE = "safe", "unsafe"


@dataclass
class Seed:
    """One question to answer: its id, conversation and carried-over meta."""

    id: str
    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of one question."""

    id: str
    status: str  # passed | failed_kept | failed_marked | failed_dropped | malformed
    record: dict[str, Any] | None  # the chain record (None when rejected)
    reason: str | None = None  # why it was rejected
    verdicts: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # stage texts so far (rejects)


@dataclass
class _Open:
    seed: Seed
    texts: dict[str, str] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    outcome: Outcome | None = None


class ChainRule:
    """Prompts, rounds and verdict words of a template, checked once up front."""

    def __init__(
        self,
        template: PromptTemplate,
        *,
        on_fail: str = "keep",
        max_new_tokens: int = 256,
        check_max_new_tokens: int = 64,
        seed: int = 0,
    ) -> None:
        if on_fail not in ON_FAIL:
            raise ValueError(f"on_fail={on_fail!r}: use one of {list(ON_FAIL)}")
        self.template, self.on_fail, self.seed = template, on_fail, seed
        self.max_new_tokens, self.check_max_new_tokens = (
            max_new_tokens,
            check_max_new_tokens,
        )
        gen = template.generation
        answer = template.stage(template.answer_stage)
        self.answer_key = answer.key
        self.extend = [s.key for s in template.trained_stages if s.name != answer.name]
        self.check_key = gen.get("check_key", "check")
        has_check = any(
            s.key == self.check_key and s.mode is StageMode.OMIT
            for s in template.stages
        )
        self.check_stage = self.check_key if has_check else None
        needed = [
            "answer",
            "check",
            *self.extend,
            *(f"answer_with_{k}" for k in self.extend),
        ]
        missing = [k for k in needed if not isinstance(gen.get(k), str)]
        for words in ("verdict_safe", "verdict_unsafe"):
            if not gen.get(words):
                missing.append(words)
        if missing:
            raise ValueError(
                f"template {template.name!r}: the `generation:` block lacks {missing}; "
                "generate-data needs one prompt per stage key, `answer_with_<key>` per "
                "added stage, `check`, and the verdict words (see "
                "prompt_templates/aligncot.yaml)"
            )
        self.prompts = {k: gen[k] for k in needed}
        self.labels = {
            SAFE: list(gen["verdict_safe"]),
            UNSAFE: list(gen["verdict_unsafe"]),
        }
        allowed = {"conversation", "question", self.answer_key, *self.extend}
        for key, text in self.prompts.items():
            fields = {f for _, f, _, _ in string.Formatter().parse(text) if f}
            if fields - allowed:
                raise ValueError(
                    f"template {template.name!r}: generation.{key} uses "
                    f"{sorted(fields - allowed)}; allowed placeholders are "
                    f"{sorted(allowed)}"
                )

    @property
    def rounds(self) -> int:
        return len(self.extend) + 1

    # --- one batched run -------------------------------------------------------------
    def run(
        self,
        generator: TextGenerator,
        seeds: Sequence[Seed],
        checker: TextGenerator | None = None,
    ) -> list[Outcome]:
        """The rule over ``seeds``; ``checker`` answers the safety checks (default: the
        generator itself, the paper's self-check)."""
        checker = checker or generator
        rows = [_Open(s) for s in seeds]
        for rnd in range(self.rounds):
            if rnd:
                key = self.extend[rnd - 1]
                self._stage(generator, rows, key, key, rnd)
            answer_prompt = (
                "answer" if rnd == 0 else f"answer_with_{self.extend[rnd - 1]}"
            )
            self._stage(generator, rows, answer_prompt, self.answer_key, rnd)
            self._check(checker, rows, rnd)
        return [r.outcome for r in rows]

    def _open(self, rows: list[_Open]) -> list[_Open]:
        return [r for r in rows if r.outcome is None]

    def _call(
        self, generator, rows, prompt_key: str, rnd: int, max_new: int
    ) -> list[str]:
        prompts = [
            [{"role": "user", "content": self._format(prompt_key, r)}] for r in rows
        ]
        tag = f"{prompt_key}:{rnd}:" + ",".join(r.seed.id for r in rows)
        replies = generator.complete(
            prompts, max_new_tokens=max_new, seed=batch_seed(self.seed, tag)
        )
        if len(replies) != len(rows):
            raise RuntimeError(
                f"the generator returned {len(replies)} replies for {len(rows)} prompts"
            )
        return [(t or "").strip() for t in replies]

    def _stage(self, generator, rows, prompt_key: str, key: str, rnd: int) -> None:
        rows = self._open(rows)
        if not rows:
            return
        for row, text in zip(
            rows, self._call(generator, rows, prompt_key, rnd, self.max_new_tokens)
        ):
            problem = self._text_problem(text)
            if problem:
                self._reject(row, f"{problem} in `{key}` (round {rnd + 1})")
            else:
                row.texts[key] = text

    def _check(self, checker, rows, rnd: int) -> None:
        """One safety check per open row.

        A checker that can constrain its decoding (``choose``) picks the verdict among
        the template's verdict words, then writes its reason freely after it: every
        verdict parses. Otherwise the verdict is parsed from free text, and a reply
        without one ends the row as ``malformed`` (counted in the report).
        """
        rows = self._open(rows)
        if not rows:
            return
        words = [self.labels[SAFE][0], self.labels[UNSAFE][0]]
        if hasattr(checker, "choose"):
            prompts = [
                [{"role": "user", "content": self._format("check", r)}] for r in rows
            ]
            picks = checker.choose(prompts, words)
            verdicts = [SAFE if i == 0 else UNSAFE for i in picks]
            tag = f"check:{rnd}:" + ",".join(r.seed.id for r in rows)
            texts = [words[i] for i in picks]
            if self.check_max_new_tokens > 1:
                texts = checker.complete(
                    prompts,
                    max_new_tokens=self.check_max_new_tokens,
                    seed=batch_seed(self.seed, tag),
                    prefixes=[w + " " for w in texts],
                )
            texts = [(t or "").strip() for t in texts]
        else:
            texts = self._call(checker, rows, "check", rnd, self.check_max_new_tokens)
            verdicts = [parse_verdict(t, self.labels) for t in texts]
        for row, text, verdict in zip(rows, texts, verdicts):
            if verdict is None:
                shown = text[:60] + ("…" if len(text) > 60 else "")
                self._reject(
                    row, f"unparseable check verdict {shown!r} (round {rnd + 1})"
                )
                continue
            if self._text_problem(text):
                self._reject(
                    row, f"{self._text_problem(text)} in the check (round {rnd + 1})"
                )
                continue
            row.verdicts.append(verdict)
            row.checks.append(text)
            if verdict == SAFE:
                self._finish(row, "passed", checker)
            elif rnd == self.rounds - 1:
                self._finish(
                    row,
                    {
                        "keep": "failed_kept",
                        "mark": "failed_marked",
                        "drop": "failed_dropped",
                    }[self.on_fail],
                    checker,
                )

    # --- helpers ----------------------------------------------------------------------
    def _format(self, prompt_key: str, row: _Open) -> str:
        values = {
            "conversation": render_conversation(row.seed.messages),
            "question": row.seed.messages[-1]["content"],
            self.answer_key: "",
            **{k: "" for k in self.extend},
            **row.texts,
        }
        return self.prompts[prompt_key].format(**values)

    def _text_problem(self, text: str) -> str | None:
        if not text:
            return "empty text"
        for marker in self.template.markers:
            if marker in text:
                return f"stage marker {marker!r}"
        return None

    def _reject(self, row: _Open, reason: str) -> None:
        row.outcome = Outcome(
            row.seed.id, "malformed", None, reason, list(row.verdicts), dict(row.texts)
        )

    def _finish(self, row: _Open, status: str, checker: TextGenerator) -> None:
        seed = row.seed
        info = {
            "status": status,
            "verdicts": row.verdicts,
            "checks": row.checks,
            "stages": [k for k in (*self.extend, self.answer_key) if k in row.texts],
            "seed": self.seed,
            "checker": getattr(checker, "name", type(checker).__name__),
            "constrained_verdicts": hasattr(checker, "choose"),
        }
        meta = {**seed.meta, "datagen": info}
        if status == "failed_marked":
            meta["needs_review"] = True
        record: dict[str, Any] = {"id": seed.id, "messages": seed.messages}
        record.update(
            {k: row.texts[k] for k in (*self.extend, self.answer_key) if k in row.texts}
        )
        if self.check_stage:
            record[self.check_stage] = row.checks[-1]
        record["meta"] = meta
        if status == "failed_dropped":
            row.outcome = Outcome(
                seed.id,
                status,
                None,
                "unsafe after the full chain",
                list(row.verdicts),
                dict(row.texts),
            )
            return
        try:
            parse_chain(record, self.template, location=f"generated {seed.id}")
        except ChainRecordError as err:
            row.outcome = Outcome(
                seed.id, "malformed", None, str(err), list(row.verdicts)
            )
            return
        row.outcome = Outcome(seed.id, status, record, None, list(row.verdicts))


def render_conversation(messages: list[dict[str, str]]) -> str:
    """``User: …`` / ``Assistant: …`` lines, the form the stage prompts embed."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
