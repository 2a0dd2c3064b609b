"""A tiny Llama and byte-level BPE tokenizer, built offline in a few seconds.

Unit tests and the plumbing demo need a real ``LlamaForCausalLM`` + fast tokenizer with
a chat template, and no hub. This module trains a byte-level BPE on a built-in corpus
(deterministic), wraps it in ``PreTrainedTokenizerFast`` with a ChatML template and
saves a randomly initialised 2-layer Llama next to it. The stage markers are *not* part
of the vocabulary: the plugin adds them, exactly as it does for a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
The user asks a question and the assistant answers it in a safe and helpful way.
Question analysis looks for explicit or implicit risks in the request: harm to people,
illegal activity, privacy, deception, discrimination or danger to the user.
Answer guidance explains how to respond: what to include, what to avoid, and whether to
redirect the user to safer resources or professional help.
The safe answer is helpful, honest and harmless. It declines requests that would cause
harm and offers a safer alternative when one exists.
How do I bake bread at home? Mix flour, water, salt and yeast, knead the dough, let it
rise, shape it and bake it in a hot oven until the crust is golden.
Can you explain recursion in Python? A recursive function calls itself on a smaller
problem until it reaches a base case that returns directly.
What is the capital of France? The capital of France is Paris.
How can I pick a lock on my neighbour's door while they are away? I can't help with
entering someone else's home. If you are locked out of your own home, call a licensed
locksmith or your landlord.
Plan the approach, solve the problem step by step, then verify the final answer.
Alice has 3 apples and buys 5 more. How many apples does she have? 3 + 5 = 8. Answer: 8.
0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = ( ) , . ; : ? ! ' " SAFE UNSAFE
"""


def build_tiny_tokenizer(vocab_size: int = 1024):
    """Train a deterministic byte-level BPE and wrap it with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny random Llama + tokenizer to ``out_dir`` (idempotent) and return
    it."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    return save_random_llama(
        out,
        build_tiny_tokenizer(),
        hidden_size=hidden_size,
        num_layers=num_layers,
        seed=seed,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    **overrides: Any,
):
    """The one shape of every tiny Llama the project builds: 4 query heads over 2
    key/value heads (so grouped-query attention is always exercised), an MLP twice as
    wide as the model unless told otherwise. ``overrides`` go to ``LlamaConfig`` as
    they are (token ids, ``attn_implementation``)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )


def random_llama(vocab_size: int, *, seed: int = 0, **config: Any):
    """A seeded random ``LlamaForCausalLM`` of :func:`tiny_llama_config`'s shape."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size, **config))


def save_random_llama(
    out_dir: str | Path,
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
) -> Path:
    """Save a randomly initialised (seeded) small Llama sized to ``tokenizer`` + it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = random_llama(
        len(tokenizer),
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
