"""Constrained verdicts read the logits at the right position.

The random tiny Llama tends to prefer the same option at every position, so reading
the logits one position late goes unseen there. Here a bigram model (each position's
logits depend only on its own token) prefers different options at neighbouring
positions: after the reply's last prompt token it prefers one option, after an
option's token the other. Only the right position gives the scripted answer.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from axolotl_mote.datagen import HFChatGenerator

CHAT = [{"role": "user", "content": "Is this reply safe?"}]


class BigramLM(torch.nn.Module):
    """logits[b, t] = W[input_ids[b, t]]: the next-token preference of each token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(vocab, vocab))
        self.name_or_path = "bigram"

    def prefer(self, after: int, token: int, score: float = 5.0) -> None:
        with torch.no_grad():
            self.weight[after, token] = score

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.weight[input_ids])


@pytest.fixture(scope="module")
def tok():
    from axolotl_mote.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prefix", ["", "Verdict: "])
@pytest.mark.parametrize("order", [["SAFE", "UNSAFE"], ["UNSAFE", "SAFE"]])
def test_first_token_read_after_the_prompt(tok, order, prefix):
    """After the prompt (+ prefix) UNSAFE is preferred; after either option's first
    token SAFE would be: the verdict is UNSAFE in both orders."""
    model = BigramLM(len(tok))
    gen = HFChatGenerator(model, tok)
    head = gen.render(CHAT) + (_ids(tok, prefix) if prefix else [])
    safe, unsafe = _ids(tok, "SAFE")[0], _ids(tok, "UNSAFE")[0]
    model.prefer(head[-1], unsafe)
    for option in (safe, unsafe):
        model.prefer(option, safe)
    assert order[gen.choose([CHAT], order, prefix=prefix)[0]] == "UNSAFE"


def test_later_tokens_read_after_the_previous_option_token(tok):
    """Options sharing their first token ("na", "no": [n, a], [n, o]): the second
    token is read after "n" (prefers "o"), not after the second token (prefers "a")."""
    n, a = _ids(tok, "na")
    n2, o = _ids(tok, "no")
    assert n == n2 and a != o
    model = BigramLM(len(tok))
    gen = HFChatGenerator(model, tok)
    model.prefer(gen.render(CHAT)[-1], n)
    model.prefer(n, o)
    model.prefer(a, a)
    model.prefer(o, a)
    assert gen.choose([CHAT], ["na", "no"]) == [1]
    assert gen.choose([CHAT], ["no", "na"]) == [0]
