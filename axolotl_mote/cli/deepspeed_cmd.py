"""``axolotl-mote deepspeed-config``: write or locate a shipped DeepSpeed JSON."""

from __future__ import annotations

import click

from axolotl_mote.deepspeed import DEEPSPEED_CONFIGS, deepspeed_config_names


@click.command("deepspeed-config")
@click.argument("name", required=False, type=click.Choice(deepspeed_config_names()))
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    help="Write a copy here: a file, or a folder (an existing one, or a path ending "
    "in /) to keep the name, e.g. ds/zero3.json.",
)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def deepspeed_config(name: str | None, output: str | None, force: bool) -> None:
    """Write the shipped DeepSpeed config NAME to -o, or print its installed path.

    Use the result as `deepspeed: <path>` in the YAML (or `--deepspeed <path>`).
    Without NAME, list the shipped configs.
    """
    from axolotl_mote.deepspeed import (
        deepspeed_config_path,
        deepspeed_output_path,
        write_deepspeed_config,
    )

    if name is None:
        for key in deepspeed_config_names():
            click.echo(f"{key:24s} {DEEPSPEED_CONFIGS[key]}")
        return
    if output is None:
        click.echo(str(deepspeed_config_path(name)))
        return
    target = deepspeed_output_path(name, output)
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; pass --force to replace it")
    written = write_deepspeed_config(name, output, overwrite=True)
    click.echo(str(written))
