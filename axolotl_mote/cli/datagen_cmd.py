"""``axolotl-mote generate-data``: self-generated chains by the check-then-extend
rule."""

from __future__ import annotations

import json

import click

from axolotl_mote.cli import options


@click.command("generate-data")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(exists=True),
    help="Seed questions: JSONL ({id, prompt | messages, meta}) or a "
    "`datasets` folder saved with save_to_disk.",
)
@options.output("Chain JSONL to append to (a rerun resumes it).")
@options.base_model("Local HF model folder: the model being aligned.")
@click.option(
    "--endpoint",
    help="OpenAI-compatible base URL instead, e.g. http://localhost:8000/v1 (vLLM).",
)
@click.option("--api-model", help="Model name the endpoint serves.")
@click.option(
    "--check-model",
    help="A separate checker for the safety checks: a local HF model folder "
    "(default: the model being aligned checks itself, as in the paper).",
)
@click.option("--check-endpoint", help="The checker behind an OpenAI-compatible URL.")
@click.option("--check-api-model", help="Model name the checker's endpoint serves.")
@click.option(
    "--concurrency",
    default=8,
    show_default=True,
    help="Endpoints: requests in flight at once.",
)
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    help="Endpoints: seconds per request before it counts as failed.",
)
@click.option(
    "--retries",
    default=3,
    show_default=True,
    help="Endpoints: retries per request (exponential backoff) before the run stops; "
    "a rerun continues where it stopped.",
)
@options.template()
@click.option(
    "--on-fail",
    type=click.Choice(["keep", "mark", "drop"]),
    default="keep",
    show_default=True,
    help="A question still unsafe after the full chain: "
    "keep it, keep it with meta.needs_review, or drop it (rejects file).",
)
@click.option(
    "--rejects",
    type=click.Path(),
    help="Rejects JSONL (default: <output stem>.rejects.jsonl).",
)
@click.option(
    "--prompt-field", help="Column holding the question (default: prompt / messages)."
)
@click.option(
    "--split", default="train", show_default=True, help="Split of a DatasetDict."
)
@click.option("--limit", type=int, help="Only the first N seed questions.")
@click.option(
    "--batch-size", default=8, show_default=True, help="Prompts generated together."
)
@click.option(
    "--max-new-tokens",
    default=256,
    show_default=True,
    help="Token budget of each generated chain.",
)
@click.option(
    "--check-max-new-tokens",
    default=64,
    show_default=True,
    help="Token budget of each safety check's verdict.",
)
@click.option(
    "--temperature", type=float, help="Sample at this temperature (default: greedy)."
)
@click.option("--top-p", type=float, help="Nucleus mass when sampling (0-1].")
@click.option(
    "--seed", default=0, show_default=True, help="Seed of sampling and of the data."
)
@options.model_loading
def generate_data(
    input_path,
    output,
    base_model,
    endpoint,
    api_model,
    check_model,
    check_endpoint,
    check_api_model,
    concurrency,
    timeout,
    retries,
    template,
    on_fail,
    rejects,
    prompt_field,
    split,
    limit,
    batch_size,
    max_new_tokens,
    check_max_new_tokens,
    temperature,
    top_p,
    seed,
    dtype,
    device,
    device_map,
    load_in_4bit,
) -> None:
    """Answer seed questions with the model and keep the shortest chain that checks
    safe."""
    from axolotl_mote.datagen import build_generator, load_seeds
    from axolotl_mote.datagen import generate_data as run
    from axolotl_mote.datagen.backends import EndpointError

    tmpl = template  # loaded (and checked) by the --template option
    common = {
        "batch_size": batch_size,
        "timeout": timeout,
        "max_retries": retries,
        "concurrency": concurrency,
        **options.loading_kwargs(dtype, device, device_map, load_in_4bit),
    }
    try:
        seeds = load_seeds(
            input_path, tmpl, prompt_field=prompt_field, split=split, limit=limit
        )
        generator = build_generator(
            base_model,
            endpoint=endpoint,
            api_model=api_model,
            temperature=temperature,
            top_p=top_p,
            **common,
        )
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    checker = None
    if check_model or check_endpoint:
        try:  # greedy: a verdict should not be sampled
            checker = build_generator(
                check_model, endpoint=check_endpoint, api_model=check_api_model,
                **common,
            )  # fmt: skip
        except ValueError as err:
            raise click.UsageError(
                f"the checker: {err} (--check-model PATH, or --check-endpoint URL "
                "with --check-api-model NAME)"
            ) from err
    try:
        report = run(
            generator,
            seeds,
            output,
            template=tmpl,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            check_max_new_tokens=check_max_new_tokens,
            seed=seed,
            on_fail=on_fail,
            rejects=rejects,
            checker=checker,
        )
    except EndpointError as err:
        raise click.ClickException(
            f"{err}. Every batch finished before it is saved in {output}; rerun the "
            "same command to continue."
        ) from err
    click.echo(json.dumps(report.to_dict(), indent=2))
    malformed = report.total.get("malformed", 0)
    if malformed:
        click.echo(
            f"{malformed} question(s) gave malformed output; see {report.rejects}",
            err=True,
        )
