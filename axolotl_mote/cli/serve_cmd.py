"""``axolotl-mote serve`` and ``axolotl-mote client``: MoTE behind an OpenAI-style
API."""

from __future__ import annotations

import json

import click

from axolotl_mote.cli import options

#: Seconds SIGTERM waits for in-flight requests (they are cancelled at once; this
#: bounds the time their replies take to go out).
SHUTDOWN_GRACE = 5


@click.command()
@click.option(
    "--adapter",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Trained MoTE adapter folder.",
)
@options.base_model("Base model (default: the adapter's).")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface; put --api-key on it).",
)
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port.")
@click.option(
    "--max-batch",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Chats per batch.",
)
@click.option(
    "--batch-wait",
    default=0.02,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a batch waits for more concurrent chat requests.",
)
@click.option(
    "--max-model-len",
    type=click.IntRange(min=1),
    default=None,
    help="Prompt + requested tokens allowed per request (default: the model's "
    "context); more is a 400 naming both numbers.",
)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests that may wait for the model; more get 503 with Retry-After.",
)
@click.option(
    "--request-timeout",
    default=300.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a request may take, queue included; at the limit its generation "
    "stops (finish_reason length, mote.stopped time_limit). 0: no limit.",
)
@click.option(
    "--max-body-bytes",
    default=4 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest request body; a larger one gets 413.",
)
@click.option(
    "--api-key",
    default=None,
    envvar="MOTE_API_KEY",
    help="Require `Authorization: Bearer KEY` on /v1/* (also MOTE_API_KEY).",
)
@options.model_loading
def serve(adapter, base_model, host, port, max_batch, batch_wait, max_model_len,
          max_queue, request_timeout, max_body_bytes, api_key, dtype, device,
          device_map, load_in_4bit) -> None:  # fmt: skip
    """Serve the exact MoTE model (/v1/chat/completions) and its per-stage adapters
    (/v1/completions, model = a stage name or `prompt`), OpenAI-compatible.

    SIGTERM (or Ctrl-C) stops accepting requests, cancels queued and running ones (a
    running batch stops at its next token) and exits within a few seconds."""
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
        worker = MoteWorker(
            model, tokenizer, max_batch=max_batch, batch_wait=batch_wait,
            max_queue=max_queue, max_model_len=max_model_len,
            request_timeout=request_timeout or None,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    if max_model_len and max_model_len > worker.context:
        click.echo(
            f"warning: --max-model-len {max_model_len} is over the model's context "
            f"({worker.context}); outputs past it are unreliable",
            err=True,
        )
    app = build_app(worker, api_key=api_key, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info",
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )  # fmt: skip

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            worker.shutdown()  # running rows end at their next token
            super().handle_exit(sig, frame)

    click.echo(
        f"serving {adapter} on http://{host}:{port}/v1 (model: mote, max model len "
        f"{worker.max_model_len})"
    )
    try:
        Server(config).run()
    finally:
        worker.close(timeout=SHUTDOWN_GRACE)


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
@click.option(
    "--max-new-tokens",
    default=256,
    show_default=True,
    help="Token budget of a whole chain (markers included).",
)
@click.option(
    "--max-stage-tokens",
    help="Cap on one stage's content: 64, or per stage: analysis=64,guidance=32 (as "
    "generate and evaluate take it).",
)
@click.option(
    "--adapter-field",
    type=click.Choice(["model", "lora_path"]),
    default="model",
    show_default=True,
    help="How the server picks the adapter: vLLM and axolotl-mote serve use `model`, "
    "SGLang `lora_path`.",
)
@click.option(
    "--timeout", default=60.0, show_default=True, help="Seconds per HTTP request."
)
@click.option(
    "--retries",
    default=2,
    show_default=True,
    help="Retries of a failed HTTP request (connection errors, 5xx).",
)
def client(bundle, url, prompts, plan, max_new_tokens, max_stage_tokens, adapter_field,
           timeout, retries) -> None:  # fmt: skip
    """Generate MoTE chains stage by stage from a server with per-request adapters."""
    from axolotl_mote.generation import split_plan
    from axolotl_mote.serving.client import HTTPBackend, ServingError, StageClient

    backend = HTTPBackend(
        url, timeout=timeout, max_retries=retries, adapter_field=adapter_field
    )
    stage_client = StageClient.from_bundle(bundle, backend)
    limits = options.stage_limits(max_stage_tokens)
    parts = split_plan(plan)
    forced = (
        None
        if parts is None
        else ([s["name"] for s in stage_client.stages] if parts == "full" else parts)
    )
    missing = 0
    for i, prompt in enumerate(prompts):
        try:
            chain = stage_client.generate(
                prompt, plan=forced, max_new_tokens=max_new_tokens,
                max_stage_tokens=limits,
            )  # fmt: skip
        except (ServingError, ValueError) as err:
            raise click.ClickException(str(err)) from None
        row = {
            "prompt": prompt,
            "plan": chain.plan,
            "stages": chain.stages,
            "answer": chain.answer,
            "fallback_used": chain.fallback_used,
            "dropped_stages": chain.dropped_stages,
        }
        click.echo(json.dumps(row, ensure_ascii=False))
        if chain.dropped_stages:
            click.echo(
                f"warning: prompt {i + 1}: stages {chain.dropped_stages} of the plan "
                f"did not fit --max-new-tokens {max_new_tokens} and were dropped",
                err=True,
            )
        if chain.answer is None:
            missing += 1
            click.echo(
                f"warning: prompt {i + 1}: no answer stage (budget "
                f"{max_new_tokens} tokens)",
                err=True,
            )
    if missing:
        raise click.ClickException(
            f"{missing} of {len(prompts)} replies have no answer"
        )
