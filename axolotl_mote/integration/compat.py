"""Every assumption axolotl-mote makes about Axolotl, transformers, PEFT, accelerate and
torch internals, named in one table and checked.

The plugin is built on public extension points where they exist (Axolotl's plugin
hooks, transformers' ``AttentionInterface``, PEFT's LoRA variants). Where it needs
more, it relies on a named function or attribute of one library version range. Each
such reliance is an :class:`Assumption` here: what is relied on, which of our modules
relies on it, and a check that the installed stack still provides it. ``check_stack()``
runs them all; ``tests/integration/test_compat.py`` runs it on both CI legs (Axolotl
0.19 and 0.21), so an upgrade that breaks one fails in a test that names it, not deep
inside a training run. The plugin also runs the checks once per process, at
``register``, and warns with the names of the failed ones (:func:`warn_broken`).

Known upstream bugs the plugin works around are listed too (``workaround=True``): when
their check starts failing (the bug is fixed or the code moved), the workaround can go.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Assumption:
    """One thing a library must provide for the plugin to work."""

    library: str
    what: str  # what is relied on, in a sentence
    used_by: str  # our module that relies on it
    check: Callable[[], bool]
    workaround: bool = False  # a work-around of a known upstream bug


def _attr(path: str) -> Callable[[], bool]:
    """``module.attr[.attr]`` exists (imported lazily)."""

    def check() -> bool:
        module_name, _, attrs = path.partition(":")
        obj = importlib.import_module(module_name)
        for name in attrs.split(".") if attrs else []:
            obj = getattr(obj, name)
        return obj is not None

    return check


def _params(path: str, *names: str) -> Callable[[], bool]:
    """The callable at ``path`` takes every parameter in ``names``."""

    def check() -> bool:
        module_name, _, attrs = path.partition(":")
        obj = importlib.import_module(module_name)
        for name in attrs.split("."):
            obj = getattr(obj, name)
        params = inspect.signature(obj).parameters
        return all(n in params for n in names)

    return check


def _field(path: str, name: str) -> Callable[[], bool]:
    """The dataclass at ``path`` has a field ``name``."""

    def check() -> bool:
        module_name, _, attr = path.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        return name in getattr(cls, "__dataclass_fields__", {})

    return check


def _plugin_hooks() -> bool:
    from axolotl.integrations.base import BasePlugin

    return all(callable(getattr(BasePlugin, hook, None)) for hook in PLUGIN_HOOKS)


def _model_loader_inference() -> bool:
    """``ModelLoader`` instances carry ``inference`` (read by a stack walk)."""
    from axolotl.loaders.model import ModelLoader

    return "inference" in inspect.signature(ModelLoader.__init__).parameters


#: the Axolotl plugin hooks MotePlugin implements
PLUGIN_HOOKS = (
    "register", "get_input_args", "load_datasets", "pre_model_load", "pre_lora_load",
    "get_lora_config_kwargs", "post_lora_load", "get_trainer_cls",
    "post_trainer_create", "get_collator_cls_and_kwargs",
    "add_callbacks_post_trainer", "post_train",
)  # fmt: skip

ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption(
        "axolotl", "BasePlugin has every hook MotePlugin implements", "plugin",
        _plugin_hooks,
    ),
    Assumption(
        "axolotl", "AxolotlTrainer (the trainer MoteTrainer extends)",
        "integration.trainer", _attr("axolotl.core.trainers.base:AxolotlTrainer"),
    ),
    Assumption(
        "axolotl", "ModelLoader(inference=...) tells `axolotl inference` apart; the "
        "hooks do not receive it, so a stack walk reads it",
        "integration.model.loading_for_inference", _model_loader_inference,
    ),
    Assumption(
        "axolotl", "save_fsdp2_lora_adapter gathers only lora_ parameters and drops "
        "PEFT's trainable tokens; the plugin wraps it for FSDP2 runs",
        "integration.fsdp.install_final_save",
        _attr("axolotl.integrations.expert_parallel.shard:save_fsdp2_lora_adapter"),
        workaround=True,
    ),
    Assumption(
        "transformers", "custom attention functions and mask builders register by "
        "name (AttentionInterface, AttentionMaskInterface)", "attention.register",
        _attr("transformers:AttentionMaskInterface.register"),
    ),
    Assumption(
        "transformers", "sdpa_attention_forward and sdpa_mask: the plain sdpa path a "
        "mote_sdpa call without a plan delegates to", "attention.mote_sdpa_attention",
        _attr("transformers.integrations.sdpa_attention:sdpa_attention_forward"),
    ),
    Assumption(
        "transformers", "lazy_import_flash_attention(name) gives the varlen kernel "
        "transformers' own flash attention uses for that name",
        "attention._flash_varlen",
        _params(
            "transformers.modeling_flash_attention_utils:lazy_import_flash_attention",
            "implementation",
        ),
    ),
    Assumption(
        "transformers", "get_target_dtype: the half dtype flash casts fp32 inputs to",
        "attention.flash_with_regions",
        _attr("transformers.integrations.flash_attention:get_target_dtype"),
    ),
    Assumption(
        "peft", "LoRA layers hand an adapter with a variant to "
        "variant.forward(module, active_adapter=, x=, result=)", "tuner.layer",
        _attr("peft.tuners.lora.layer:LoraVariant"),
    ),
    Assumption(
        "peft", "trainable_token_indices trains the marker rows",
        "integration.model.marker_trainable_token_indices",
        _field("peft:LoraConfig", "trainable_token_indices"),
    ),
    Assumption(
        "torch", "causal_lower_right: the bottom-right causal mask of a region",
        "attention.region_attention",
        _attr("torch.nn.attention.bias:causal_lower_right"),
    ),
)  # fmt: skip


def check_stack(libraries: tuple[str, ...] | None = None) -> list[str]:
    """Every assumption the installed stack breaks, as ``library: what (used by)``."""
    broken = []
    for item in ASSUMPTIONS:
        if libraries is not None and item.library not in libraries:
            continue
        try:
            ok = bool(item.check())
        except Exception:  # noqa: BLE001 - a missing module or name is a broken one
            ok = False
        if not ok:
            broken.append(f"{item.library}: {item.what} (used by {item.used_by})")
    return broken


_WARNED: list[bool] = []


def warn_broken() -> None:
    """Log, once per process, every assumption the installed stack breaks (the plugin's
    ``register``): a named cause beats a failure deep inside a run."""
    if _WARNED:
        return
    _WARNED.append(True)
    broken = check_stack()
    if broken:
        from axolotl_mote.log import get_logger

        get_logger("axolotl_mote").warning(
            "MoTE: the installed libraries no longer provide what the plugin relies "
            "on (axolotl_mote/integration/compat.py):\n  - %s",
            "\n  - ".join(broken),
        )
