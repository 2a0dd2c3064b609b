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


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

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
