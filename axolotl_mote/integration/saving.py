"""Making every saved adapter self-describing: ``mote_config.json`` and a model card.

The expert weights are ordinary PEFT LoRA tensors (rank blocks), saved by PEFT in
``adapter_model.safetensors`` by every path Axolotl uses (checkpoints, final save,
ZeRO-3 gathered save). What this module adds, on the main process:

* ``mote_config.json``: stages, alpha, shared expert, prompt routing, expert rank and
  the full template, so the adapter loads and generates on its own;
* a section in the adapter's ``README.md`` (PEFT's model card, which already carries
  the ``axolotl-mote`` tags) saying that this is a *routed* adapter and how to load it:
  plain ``PeftModel.from_pretrained`` would run every expert on every token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from axolotl_mote.settings import settings_of

CARD_HEADING = "## MoTE: a routed adapter"

CARD_SECTION = f"""{CARD_HEADING}

This is a **MoTE** adapter (Mixture of insighTful Experts, Liu et al., ACL 2025, made
with the `axolotl-mote` package): every LoRA layer holds
one expert per reasoning stage plus a shared expert, and each token must be routed to
its stage's expert. `mote_config.json` beside this file describes the stages.

**Do not load it with plain `PeftModel.from_pretrained`**: that runs it unrouted (every
expert on every token), which is not the trained model. Load it with

```python
from axolotl_mote import load_mote_model
from axolotl_mote.generation import generate_chains

model, tokenizer = load_mote_model("BASE_MODEL", "THIS_FOLDER")
print(generate_chains(model, tokenizer, ["How do I pick a lock?"])[0].stages)
```

or `axolotl-mote generate --adapter THIS_FOLDER --base-model BASE_MODEL`, or in Axolotl
with `plugins: [axolotl_mote.MotePlugin]` and `lora_model_dir: THIS_FOLDER`. For
servers without per-token routing, `axolotl-mote export` writes one plain LoRA per
stage.
"""


def _is_main_process() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def write_mote_config(
    cfg: Any, out_dir: str | os.PathLike | None, model: Any = None
) -> Path | None:
    """Write mote_config.json and the card section into ``out_dir`` (idempotent,
    main process only). ``model`` records the trained vocabulary size."""
    import dataclasses

    if out_dir is None or not _is_main_process():
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    config = settings_of(cfg).config
    rows = embedding_rows(model)
    if rows is not None:
        config = dataclasses.replace(config, vocab_size=rows)
    path = config.save(out_dir)
    write_model_card(out_dir)
    return path


def embedding_rows(model: Any) -> int | None:
    """The model's vocabulary size after any resize (``resize_token_embeddings``
    updates the config), read from the config: no weight is touched, which under
    ZeRO-3 would need a gather."""
    while (
        model is not None and not hasattr(model, "config") and hasattr(model, "module")
    ):
        model = model.module  # DDP / DeepSpeed engine
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    return int(rows) if rows else None


def write_model_card(out_dir: str | os.PathLike) -> Path:
    """Add the "routed adapter" section to ``out_dir/README.md`` (once)."""
    card = Path(out_dir) / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if CARD_HEADING not in text:
        if not text:
            text = "---\nlibrary_name: peft\ntags:\n- axolotl-mote\n- mote\n---\n"
        card.write_text(text.rstrip("\n") + "\n\n" + CARD_SECTION, encoding="utf-8")
    return card
