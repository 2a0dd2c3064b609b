"""The option vocabulary every ``axolotl-mote`` command shares, declared once.

========================  =========================================================
option                    meaning, in every command that takes it
========================  =========================================================
``-o/--output``           where results go (a file or a folder, per command)
``--config``              an Axolotl YAML (``base_model``, ``mote.template``, data)
``--base-model``          a Hugging Face causal LM folder (the model MoTE trained on)
``--adapter``             a trained MoTE adapter folder (``output_dir`` of a run)
``--template``            a shipped template name or a template YAML path
``--plan``                ``adaptive``, ``full`` or stages, e.g. ``"analysis>answer"``
``--dtype``               ``auto`` (bf16 on a GPU that has it, else fp32), or a dtype
``--device``              ``cpu``, ``cuda``, ``cuda:1``… (default: cuda if available)
``--device-map``          ``auto`` shards a big model over the visible GPUs
``--load-in-4bit``        an NF4 base model through bitsandbytes
========================  =========================================================

Bad values are answered with a usage error that names the option and the fix, never a
traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from axolotl_mote.loading import DTYPES


def output(help_text: str, required: bool = True, **kwargs: Any) -> Callable:
    return click.option(
        "-o",
        "--output",
        "output",
        required=required,
        type=click.Path(),
        help=help_text,
        **kwargs,
    )


def config(help_text: str = "The Axolotl YAML of the run.") -> Callable:
    return click.option(
        "--config", type=click.Path(exists=True, dir_okay=False), help=help_text
    )


def base_model(help_text: str = "Base model folder (Hugging Face format).") -> Callable:
    return click.option("--base-model", "base_model", help=help_text)


def _template(ctx, param, value):
    if value is None:
        return None
    from axolotl_mote.templates import load_template

    try:
        return load_template(value)
    except (ValueError, FileNotFoundError) as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def template(default: str | None = "aligncot") -> Callable:
    return click.option(
        "--template",
        default=default,
        show_default=default is not None,
        callback=_template,
        help="Template name (aligncot, plan_solve_verify) or a template YAML path.",
    )


def _plan(ctx, param, value):
    from axolotl_mote.generation import split_plan

    try:
        return split_plan(value)
    except (ValueError, TypeError) as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def plan() -> Callable:
    return click.option(
        "--plan",
        default="adaptive",
        show_default=True,
        callback=_plan,
        help='adaptive | full | stages in order, e.g. "analysis>answer" (quote it: '
        "> is a shell redirect) or analysis,answer.",
    )


def prompt_routing() -> Callable:
    return click.option(
        "--prompt-routing",
        default=None,
        help="Override the adapter's prompt routing at inference: random (one drawn "
        "step expert per prompt), expected (every step expert at alpha/E: the "
        "expected value of random), shared, or a stage name/key. Default: the "
        "adapter's own.",
    )


def model_loading(func: Callable) -> Callable:
    """``--dtype``, ``--device``, ``--device-map``, ``--load-in-4bit``."""
    func = click.option(
        "--load-in-4bit",
        is_flag=True,
        help="Load the base model in 4-bit NF4 (bitsandbytes).",
    )(func)
    func = click.option(
        "--device-map",
        default=None,
        help="transformers device_map, e.g. auto (shard over the visible GPUs).",
    )(func)
    func = click.option(
        "--device", default=None, help="cpu, cuda, cuda:1… (default: cuda if available)"
    )(func)
    return click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default="auto",
        show_default=True,
        help="auto: bf16 on a GPU that supports it, fp32 on CPU.",
    )(func)


def loading_kwargs(
    dtype: str, device: str | None, device_map: str | None, load_in_4bit: bool
) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "device": device,
        "device_map": device_map,
        "load_in_4bit": load_in_4bit,
    }


def stage_limits(value: str | None) -> int | dict[str, int] | None:
    """``64`` -> 64 for every stage; ``analysis=64,guidance=32`` -> per stage."""
    if not value:
        return None
    try:
        if "=" not in value:
            return int(value)
        pairs = (p.split("=", 1) for p in value.split(","))
        return {k.strip(): int(v) for k, v in pairs}
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give a number (64) or stage=number pairs "
            "(analysis=64,guidance=32)",
            param_hint="--max-stage-tokens",
        ) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """An Axolotl YAML as a dict, or a usage error naming the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise click.BadParameter(str(err), param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} is not a YAML mapping", param_hint="--config")
    return data


def check_prompt_routing(value: str | None, adapter: str | Path) -> None:
    """Refuse a ``--prompt-routing`` the adapter cannot take (an unknown word or stage,
    ``shared`` without a shared expert), before any model loads."""
    from axolotl_mote.tuner.config import MoteConfig

    if value is None:
        return
    try:
        MoteConfig.load(adapter).resolve_prompt_routing(value)
    except FileNotFoundError:
        return  # not a MoTE adapter: check_plans / the loader say so
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--prompt-routing") from None


def check_plans(plans: list[Any], adapter: str | Path) -> None:
    """Refuse a plan the adapter's template cannot run, before any model loads."""
    from axolotl_mote.generation import parse_plan
    from axolotl_mote.tuner.config import MoteConfig

    try:
        template = MoteConfig.load(adapter).prompt_template()
    except (FileNotFoundError, ValueError) as err:
        raise click.BadParameter(str(err), param_hint="--adapter") from None
    for plan in plans:
        try:
            parse_plan(plan, template)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--plan") from None
