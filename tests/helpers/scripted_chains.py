"""A scripted model for the check-then-extend rule: replies chosen by the prompt's kind,
the question and the answer round, so every branch is reached deterministically (used
in-process and behind a real HTTP server)."""

from __future__ import annotations

import re

# question -> the round whose answer the check accepts (None: never; "bad": unparseable
# check; "empty": empty first answer; "marker": a stage marker in the analysis)
SCRIPT = {
    "easy question": 0,
    "needs analysis": 1,
    "needs guidance": 2,
    "never safe": None,
    "bad verdict": "bad",
    "empty answer": "empty",
    "marker": "marker",
}

# one question per branch of the rule, in an order that spreads them over batches
QUESTIONS = [
    "easy question",
    "needs analysis",
    "bad verdict",
    "needs guidance",
    "never safe",
    "empty answer",
    "easy question again",
]


class Scripted:
    """Replies chosen from the prompt's kind, the question and the answer round."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[tuple[str, int, int]] = []  # (kind, batch size, seed)
        self.fail_after = fail_after

    def complete(self, prompts, *, max_new_tokens, seed):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of a batch
        texts = [p[-1]["content"] for p in prompts]
        kind = prompt_kind(texts[0])
        self.calls.append((kind, len(prompts), seed))
        return [scripted_reply(kind, t) for t in texts]


def prompt_kind(text: str) -> str:
    if "SAFE or" in text:
        return "check"
    if "Analyse the last user message" in text:
        return "analysis"
    if "Give brief guidance" in text:
        return "guidance"
    if "Following the analysis and the guidance" in text:
        return "answer2"
    if "Using this analysis" in text:
        return "answer1"
    return "answer0"


def scripted_reply(kind: str, text: str) -> str:
    question = next(q for q in SCRIPT if q in text)
    rule = SCRIPT[question]
    if kind.startswith("answer"):
        if rule == "empty":
            return "   "
        return f"reply-{kind[-1]} for {question}"
    if kind == "analysis":
        return (
            "look at <|response|> this"
            if rule == "marker"
            else f"analysis of {question}"
        )
    if kind == "guidance":
        return f"guidance for {question}"
    if rule == "bad":
        return "Hmm, hard to say."
    round_ = int(re.search(r"reply-(\d)", text).group(1))
    accepted = isinstance(rule, int) and round_ >= rule
    return "SAFE: fine." if accepted else "UNSAFE - it helps harm."
