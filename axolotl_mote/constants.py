"""Names and sentinel values shared by every module of axolotl-mote.

Kept dependency-free so that any layer (data, tuner, trainer, CLI) can import it.
"""

from __future__ import annotations

#: Batch / dataset column carrying one stage index per token.
STEP_IDS_KEY = "step_ids"

#: ``step_ids`` value of padding tokens. Padding gets no adapter contribution.
PAD_STEP = -1

#: ``step_ids`` value of conversation (question) tokens and of ``mode: context``
#: stages. How they are routed is decided by ``mote.prompt_routing``.
PROMPT_STEP = -2

#: Routing-only ``step_ids`` values (never in a dataset): generation resolves every
#: prompt token to a concrete routing before the forward. ``SHARED_ONLY_STEP``: the
#: shared expert alone. ``EXPECTED_STEP``: the expected value of random routing, every
#: step expert at alpha / E plus the shared expert at 1 - alpha.
SHARED_ONLY_STEP = -3
EXPECTED_STEP = -4

#: ``mote.prompt_routing`` values besides a stage name.
PROMPT_ROUTINGS = ("random", "shared", "expected")

#: Values ``>= 0`` index the trained stages in template order (expert ids).
#: The shared expert is not a step id: it is active for every routed token.
SHARED_EXPERT = "shared"

#: File written next to every saved adapter / checkpoint that makes it self-describing.
MOTE_CONFIG_NAME = "mote_config.json"

#: Written beside each exported per-stage adapter (``axolotl-mote export``).
EXPORT_INFO_NAME = "mote_export.json"

#: Labels value ignored by the loss (matches transformers / axolotl).
IGNORE_INDEX = -100

#: The environment every offline run sets (tests, the quickstart, benchmarks, the test
#: launcher): no hub, no telemetry (a missing AXOLOTL_DO_NOT_TRACK can hang at exit), no
#: tokenizer threads. The one place it is written.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
