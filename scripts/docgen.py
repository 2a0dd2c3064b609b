"""Generate docs/configuration.md from the field descriptions in args.py.

``make docs`` runs it; ``tests/test_args.py`` checks the committed page is current, so
the documentation of every ``mote:`` key lives in exactly one place.
"""

from __future__ import annotations

import json

from axolotl_mote.args import MoteOptions

HEADER = """# Configuration: the `mote:` block

Generated from `axolotl_mote/args.py` by `make docs` — edit the field descriptions
there.

Every key is optional. Axolotl's own keys keep their meaning: `lora_r` is the rank of
**each** expert, `lora_alpha` scales each expert like a rank-`lora_r` LoRA,
`lora_target_modules` / `lora_target_linear` choose the layers that get experts, `seed`
seeds MoTE's draws unless `mote.seed` is set.

| key | default | description |
|---|---|---|
"""


def render() -> str:
    rows = []
    for name, field in MoteOptions.model_fields.items():
        default = field.default
        if hasattr(default, "value"):
            default = default.value
        rows.append(
            f"| `{name}` | `{json.dumps(default)}` | {field.description or ''} |"
        )
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
