"""Step-routed LoRA experts on PEFT LoRA layers (torch + peft only; no Axolotl).

``config`` describes the experts, ``layer`` holds the per-layer routing hook, ``model``
attaches it to a PEFT model, ``reference`` is the naive per-expert loop tests compare
to.
"""
