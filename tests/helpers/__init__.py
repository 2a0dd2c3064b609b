"""Shared test helpers: tiny models and tokenizers, in-process training, distributed
launches."""
