"""``register``: what the plugin does to the raw YAML dict, before Axolotl validates
it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from axolotl_mote.args import KERNEL_KEYS
from axolotl_mote.constants import EXPORT_INFO_NAME, MOTE_CONFIG_NAME
from axolotl_mote.log import get_logger
from axolotl_mote.templates import PromptTemplate, load_template

LOG = get_logger("axolotl_mote")


def prepare_raw_config(cfg: dict) -> None:
    """Defaults and checks on the raw config dict.

    - turns Axolotl's fused LoRA kernels off when unset (they bypass routing; an
      explicit ``true`` is rejected by validation with the fix);
    - adds the template's stage markers to ``special_tokens.additional_special_tokens``
      so Axolotl's tokenizer and embedding resize include them;
    - refuses ``axolotl merge-lora`` on a routed MoTE adapter;
    - refuses resuming FSDP2 ``FULL_STATE_DICT`` checkpoints (see
      :func:`check_fsdp2_resume`);
    - checks local JSONL datasets record by record (``mote.validate_files``).

    A ``mote:`` block that does not parse is left for validation, which reports it
    with every other problem. Library internals the plugin relies on that the
    installed versions no longer provide are named in a warning (``compat.py``).
    """
    from axolotl_mote.integration.compat import warn_broken

    warn_broken()
    if cfg.get("mote") is None:
        cfg["mote"] = {}
    opts = cfg["mote"]
    if not isinstance(opts, dict):
        return
    for key in KERNEL_KEYS:
        if cfg.get(key) is None:
            cfg[key] = False
    try:
        template = load_template(opts.get("template") or "aligncot")
    except (ValueError, FileNotFoundError, TypeError):
        return  # validation names the bad template with the fix
    if opts.get("marker_tokens") == "reserved":
        use_reserved_tokens(cfg, template)
    else:
        special = cfg.get("special_tokens") or {}
        extra = list(special.get("additional_special_tokens") or [])
        extra += [m for m in template.markers if m not in extra]
        special["additional_special_tokens"] = extra
        cfg["special_tokens"] = special
    _refuse_merging_routed_adapter(cfg)
    check_fsdp2_resume(cfg)
    warn_fsdp1(cfg)
    if opts.get("validate_files", True):
        validate_dataset_files(cfg, template)
    else:
        refuse_empty_files(cfg)


def use_reserved_tokens(cfg: dict, template: PromptTemplate) -> None:
    """``mote.marker_tokens: reserved``: rename unused reserved special tokens to the
    markers through Axolotl's ``added_tokens_overrides`` (no vocabulary resize)."""
    from transformers import AutoTokenizer

    from axolotl_mote.markers import reserved_token_overrides

    source = (
        cfg.get("tokenizer_config") or cfg.get("base_model_config") or cfg["base_model"]
    )
    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=bool(cfg.get("trust_remote_code"))
    )
    overrides = {
        int(k): v for k, v in (cfg.get("added_tokens_overrides") or {}).items()
    }
    taken = set(overrides.values())
    new = {
        i: m
        for i, m in reserved_token_overrides(tokenizer, template).items()
        if m not in taken and i not in overrides
    }
    overrides.update(new)
    cfg["added_tokens_overrides"] = overrides
    if new:
        LOG.info("MoTE: markers on reserved tokens (no resize): %s", new)


def fsdp2_state_dict_type(cfg: dict) -> str | None:
    """``fsdp_config.state_dict_type`` of an FSDP2 run (either spelling), else None."""
    from axolotl_mote.integration.fsdp import is_fsdp2

    if not is_fsdp2(cfg):
        return None
    fsdp = cfg.get("fsdp_config") or {}
    return fsdp.get("state_dict_type") or fsdp.get("fsdp_state_dict_type")


def check_fsdp2_resume(cfg: Any, warn: bool = True) -> None:
    """FSDP2 checkpoints resume only from ``SHARDED_STATE_DICT``.

    With ``FULL_STATE_DICT`` accelerate reads the adapter on rank 0 only and hands
    the other ranks an empty state dict: for a MoTE run PEFT then raises ``KeyError``
    on the marker rows (``trainable_tokens_delta``) after the model is built; a plain
    LoRA run resumed that way ends with another adapter than the uninterrupted run
    (max |difference| 0.25 on the tiny test model, 2 CPU ranks). Refused before
    anything loads, with the fix; without a resume only a warning, since such
    checkpoints are still whole, loadable adapters. Run on the raw YAML
    (``register``) and again on the validated config (``pre_model_load``, without
    the warning), where an unversioned ``fsdp_config`` has become FSDP2 in Axolotl
    0.21.
    """
    kind = fsdp2_state_dict_type(cfg)
    if kind is None or kind == "SHARDED_STATE_DICT":
        return
    if cfg.get("resume_from_checkpoint") or cfg.get("auto_resume_from_checkpoints"):
        raise ValueError(
            f"fsdp_config.state_dict_type: {kind} with fsdp_version: 2 cannot resume "
            "training: accelerate loads that checkpoint on rank 0 only, so the other "
            "ranks would not get the experts and marker rows back. Resume from a run "
            "trained with `fsdp_config.state_dict_type: SHARDED_STATE_DICT` (its "
            "checkpoints resume exactly; the plugin still writes the final adapter "
            "whole), or load this checkpoint's adapter with `lora_model_dir` and "
            "train on from there."
        )
    if warn and cfg.get("save_strategy") != "no":
        LOG.warning(
            "MoTE: FSDP2 with fsdp_config.state_dict_type: %s writes checkpoints that "
            "load as adapters but cannot resume training; use SHARDED_STATE_DICT to "
            "resume (the final adapter is written whole either way).",
            kind,
        )


def warn_fsdp1(cfg: dict) -> None:
    """Say that FSDP1 (an explicit ``fsdp_version: 1``) is untested with MoTE.

    Not refused: FSDP1 wraps whole decoder layers and MoTE's routed forward reads
    ``lora_A`` / ``lora_B`` through their modules where a wrapper owns the weights, so
    it may well work. But accelerate's FSDP1 plugin will not start without an
    accelerator, so no test here runs it, and Axolotl itself asks FSDP1 users to move
    to FSDP2, which the plugin tests and whose final save it mends.
    """
    from axolotl_mote.integration.fsdp import fsdp_version

    if fsdp_version(cfg) == "1":
        LOG.warning(
            "MoTE: fsdp_version: 1 (FSDP1) is not tested with MoTE (accelerate's "
            "FSDP1 needs a GPU to start, so the CPU tests cannot run it); FSDP2 and "
            "DeepSpeed ZeRO 1-3 are. Set `fsdp_version: 2` (docs/multi_node.md, FSDP2) "
            "or use `deepspeed:`; a MoTE-specific FSDP1 failure is a bug to report."
        )


def _refuse_merging_routed_adapter(cfg: dict) -> None:
    lora_dir = cfg.get("lora_model_dir")
    exported = lora_dir and (Path(lora_dir) / EXPORT_INFO_NAME).exists()
    if cfg.get("merge_lora") and exported and not cfg.get("merge_method"):
        # Axolotl's default memory-efficient merge folds only LoRA A/B into the base
        # shards: it would drop the trained marker rows and the vocabulary resize.
        cfg["merge_method"] = "legacy"
        LOG.info(
            "MoTE: merging exported stage adapter %s with merge_method: legacy "
            "(keeps the marker token rows)",
            lora_dir,
        )
    routed = lora_dir and (Path(lora_dir) / MOTE_CONFIG_NAME).exists()
    if cfg.get("merge_lora") and routed:
        raise ValueError(
            f"{lora_dir} is a routed MoTE adapter: merging it would sum every stage "
            "expert into one LoRA. Export per-stage adapters first with `axolotl-mote "
            f"export --adapter {lora_dir} --output <dir>`, then merge one of them."
        )


def mote_datasets(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The dataset entries (train and test) of ``type: axolotl_mote.*``."""
    return [
        ds
        for group in ("datasets", "test_datasets")
        for ds in cfg.get(group) or []
        if isinstance(ds, dict) and str(ds.get("type", "")).startswith("axolotl_mote.")
    ]


def dataset_files(cfg: dict[str, Any], root: Path | None = None) -> list[Path]:
    """Local ``.jsonl`` files of every dataset of ``type: axolotl_mote.*``.

    Relative paths are read from the working directory, as Axolotl reads them (or
    from ``root``, e.g. the config's folder, when they are not there). A ``.jsonl``
    path that exists nowhere is returned too, so the caller reports it.
    """
    out: list[Path] = []
    for ds in mote_datasets(cfg):
        path = Path(str(ds.get("path", "")))
        if not path.exists() and root is not None and (root / path).exists():
            path = root / path
        if path.is_dir():
            out += sorted(path.glob("*.jsonl"))
        elif path.suffix == ".jsonl":
            out.append(path)
    return out


def refuse_empty_files(cfg: dict) -> None:
    """An empty JSONL would reach ``datasets`` and die with a bare ``StopIteration``;
    name the file instead (cheap: reads up to the first non-blank line)."""
    for file in dataset_files(cfg):
        if not file.is_file():
            raise FileNotFoundError(f"dataset file {file} not found")
        with open(file, "rb") as handle:
            if not any(line.strip() for line in handle):
                raise ValueError(
                    f"{file}: no records (the file is empty or holds only blank "
                    "lines); add one JSON chain record per line, or remove the dataset"
                )


def validate_dataset_files(cfg: dict, template: PromptTemplate) -> None:
    """Pre-flight check of local datasets: every bad record listed at once."""
    from axolotl_mote.data.schema import ChainRecordError, check_jsonl

    problems = []
    for file in dataset_files(cfg):
        if not file.is_file():
            problems.append(f"{file}: dataset file not found")
            continue
        report = check_jsonl(file, template)
        if report.ok:
            LOG.info("MoTE: %s passed the record check: %s", file, report.counts())
        else:
            problems.append(report.message())
    if problems:
        raise ChainRecordError(
            "MoTE: bad chain records (fix them, or check a file with `axolotl-mote "
            "validate FILE`):\n" + "\n".join(problems)
        )
