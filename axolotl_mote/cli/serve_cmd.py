"""``axolotl-mote serve`` and ``axolotl-mote client``: MoTE behind an OpenAI-style
API."""

from __future__ import annotations

import json

import click

from axolotl_mote.cli import options


@click.command()
@click.option(
    "--adapter",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Trained MoTE adapter folder.",
)
@options.base_model("Base model (default: the adapter's).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-batch", default=8, show_default=True, help="Chats per batch.")
@click.option(
    "--batch-wait",
    default=0.02,
    show_default=True,
    help="Seconds a batch waits for more concurrent chat requests.",
)
@options.model_loading
def serve(adapter, base_model, host, port, max_batch, batch_wait, dtype, device,
          device_map, load_in_4bit) -> None:  # fmt: skip
    """Serve the exact MoTE model (/v1/chat/completions) and its per-stage adapters
    (/v1/completions, model = a stage name or `prompt`), OpenAI-compatible."""
    from pathlib import Path

    import uvicorn

    from axolotl_mote.cli.generate_cmd import resolve_base_model
    from axolotl_mote.loading import load_mote_model
    from axolotl_mote.serving.server import MoteWorker, build_app

    base = resolve_base_model(base_model, None, Path(adapter))
    try:
        model, tokenizer = load_mote_model(
            base,
            adapter,
            **options.loading_kwargs(dtype, device, device_map, load_in_4bit),
        )
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    worker = MoteWorker(model, tokenizer, max_batch=max_batch, batch_wait=batch_wait)
    click.echo(f"serving {adapter} on http://{host}:{port}/v1 (model: mote)")
    try:
        uvicorn.run(build_app(worker), host=host, port=port, log_level="info")
    finally:
        worker.close()


@click.command()
@click.option(
    "--bundle",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A serving bundle (axolotl-mote export --serving): manifest and tokenizer.",
)
@click.option(
    "--url", required=True, help="The server's base URL, e.g. http://host:8000/v1"
)
@click.option("--prompt", "prompts", multiple=True, required=True, help="Repeatable.")
@click.option(
    "--plan",
    default="adaptive",
    show_default=True,
    help='adaptive, full, or stages, e.g. "analysis>answer" (quote it).',
)
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--max-stage-tokens", type=int, default=None)
@click.option(
    "--adapter-field",
    type=click.Choice(["model", "lora_path"]),
    default="model",
    show_default=True,
    help="How the server picks the adapter: vLLM and axolotl-mote serve use `model`, "
    "SGLang `lora_path`.",
)
@click.option("--timeout", default=60.0, show_default=True)
@click.option("--retries", default=2, show_default=True)
def client(bundle, url, prompts, plan, max_new_tokens, max_stage_tokens, adapter_field,
           timeout, retries) -> None:  # fmt: skip
    """Generate MoTE chains stage by stage from a server with per-request adapters."""
    from axolotl_mote.generation import split_plan
    from axolotl_mote.serving.client import HTTPBackend, ServingError, StageClient

    backend = HTTPBackend(
        url, timeout=timeout, max_retries=retries, adapter_field=adapter_field
    )
    stage_client = StageClient.from_bundle(bundle, backend)
    parts = split_plan(plan)
    forced = (
        None
        if parts is None
        else ([s["name"] for s in stage_client.stages] if parts == "full" else parts)
    )
    for prompt in prompts:
        try:
            chain = stage_client.generate(
                prompt, plan=forced, max_new_tokens=max_new_tokens,
                max_stage_tokens=max_stage_tokens,
            )  # fmt: skip
        except (ServingError, ValueError) as err:
            raise click.ClickException(str(err)) from None
        row = {"prompt": prompt, "plan": chain.plan, "stages": chain.stages}
        click.echo(json.dumps(row, ensure_ascii=False))
