"""``axolotl-mote`` (also ``axolotl mote``): the plugin's own commands.

Each command is a thin wrapper: parse options, call a library function, print where the
outputs went. Heavy imports happen inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command; missing modules are reported on use.
_COMMANDS = {
    "quickstart": "axolotl_mote.cli.quickstart_cmd:quickstart",
    "validate": "axolotl_mote.cli.data_cmd:validate",
    "template": "axolotl_mote.cli.data_cmd:template_cmd",
    "build-tiny-model": "axolotl_mote.cli.data_cmd:build_tiny_model_cmd",
    "deepspeed-config": "axolotl_mote.cli.deepspeed_cmd:deepspeed_config",
    "prepare-smollm2": "axolotl_mote.cli.model_cmd:prepare_smollm2",
    "generate": "axolotl_mote.cli.generate_cmd:generate",
    "export": "axolotl_mote.cli.export_cmd:export",
    "serve": "axolotl_mote.cli.serve_cmd:serve",
    "client": "axolotl_mote.cli.serve_cmd:client",
    "generate-data": "axolotl_mote.cli.datagen_cmd:generate_data",
    "convert-hh": "axolotl_mote.cli.convert_cmd:convert_hh_cmd",
    "evaluate": "axolotl_mote.cli.evaluate_cmd:evaluate",
}


#: Top-level module -> the extra of pyproject.toml that installs it.
EXTRAS = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "openai": "serve",
    "matplotlib": "eval",
    "deepspeed": "deepspeed",
    "gguf": "smollm2",
}

#: Known, harmless third-party log lines on every model-loading command: logger ->
#: message patterns (searched). Only these records, below ERROR, are dropped;
#: everything else from these loggers (and every other warning and error) still shows.
LOG_NOISE = {
    # optional CUDA kernels that a CPU or older-GPU install cannot load
    "torchao": (r"Failed to load .*\.so",),
    # torchao registers enums as pytree constants, deprecated by torch 2.11
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported",),
    # DeepSpeed's accelerator probe on a machine without GPUs
    "DeepSpeed": (r"Setting accelerator to CPU",),
    # bitsandbytes on a machine without GPUs (older releases)
    "bitsandbytes.cextension": (r"compiled without GPU support",),
}

#: Known deprecation warnings raised inside third-party packages (module regex,
#: message regex); any other DeprecationWarning or FutureWarning still shows.
WARNING_NOISE = (
    (r"torch\.jit\._script", r"`torch\.jit\.script_method` is deprecated"),
)


class _NoiseFilter:
    def __init__(self, patterns: tuple[str, ...]) -> None:
        import re

        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record) -> bool:
        if record.levelno >= 40:  # logging.ERROR: never hidden
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to drop
            return True
        return not any(p.search(message) for p in self.patterns)


def quiet_third_party_noise() -> None:
    """Drop the known third-party noise (``LOG_NOISE``, ``WARNING_NOISE``) for this
    process: the project's own commands call it before anything heavy loads."""
    import logging
    import warnings

    for name, patterns in LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoiseFilter) for f in logger.filters):
            logger.addFilter(_NoiseFilter(patterns))
    for module, message in WARNING_NOISE:
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings(
                "ignore", message=message, category=category, module=module
            )


def missing_extra(err: BaseException | None, command: str | None = None) -> str | None:
    """One line naming the pip command when ``err`` (or what caused it) is a missing
    optional package of an extra; None for any other error."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ModuleNotFoundError) and err.name:
            top = err.name.split(".")[0]
            if top in EXTRAS:
                who = f"`axolotl-mote {command}`" if command else "this command"
                return (
                    f"{who} needs the {top} package: pip install "
                    f"'axolotl-mote[{EXTRAS[top]}]'"
                )
        err = err.__cause__ or err.__context__
    return None


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def invoke(self, ctx):
        quiet_third_party_noise()
        words = [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except ImportError as err:
            line = missing_extra(err, words[0] if words else None)
            if line is None:
                raise
            raise click.ClickException(line) from None

    def get_command(self, ctx, name):
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            return None
        return getattr(module, attr)


@click.group(cls=_LazyGroup)
@click.version_option(package_name="axolotl-mote")
def main() -> None:
    """MoTE (Mixture of insighTful Experts) tools for Axolotl.

    Every command shares one option vocabulary (-o/--output, --config, --base-model,
    --adapter, --template, --plan, --dtype auto, --device); see
    `axolotl-mote COMMAND --help`.
    """


if __name__ == "__main__":
    main()
