"""``axolotl-mote evaluate``: stage-routed generation on prompt sets, scored and
reported."""

from __future__ import annotations

from pathlib import Path

import click

from axolotl_mote.cli import options


def _models(base_model, adapters, include_base, loading):
    from axolotl_mote.cli.generate_cmd import resolve_base_model
    from axolotl_mote.evaluation import ModelSpec

    specs = []
    for value in adapters:
        name, sep, path = value.partition("=")
        if not sep or Path(value).exists():
            name, path = Path(value).name, value
        if not Path(path).is_dir():
            raise click.UsageError(f"--adapter {value}: no directory {path}")
        base = resolve_base_model(base_model, None, Path(path))
        specs.append(ModelSpec(name, base, path, loading=loading))
    if include_base or not adapters:
        base = base_model or (specs[0].base_model if specs else None)
        if not base:
            raise click.UsageError("evaluating the base model needs --base-model")
        specs.insert(0, ModelSpec("base", base, None, loading=loading))
    return specs


@click.command()
@click.option(
    "--prompts",
    "prompt_sets",
    multiple=True,
    help="A prompt set, [kind=]path (JSONL or CSV); kind: harmful, jailbreak, "
    "benign, mixed (default: from the file name). Repeatable.",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    help="A trained MoTE adapter dir, or name=dir. Repeat to compare several.",
)
@click.option("--base-model", help="Base model path (default: the adapter's).")
@click.option(
    "--include-base",
    is_flag=True,
    help="Also evaluate the base model without an adapter (comparison column).",
)
@click.option(
    "--compare",
    "compare_files",
    multiple=True,
    type=click.Path(exists=True),
    help="Instead of generating: merge these results.json into one table.",
)
@options.output("Folder for results.json, results.md, *.png, generations/.")
@click.option(
    "--scorer",
    default="learned",
    show_default=True,
    help="learned (offline, fitted on public human labels), string (offline "
    "phrase rules), judge, or module:builder; measured in docs/evaluation.md.",
)
@click.option(
    "--rubric",
    type=click.Path(exists=True),
    help="Rubric YAML (default: prompt_templates/rubrics/judge.yaml).",
)
@click.option("--judge-model", help="Judge: a local HF model path.")
@click.option("--judge-endpoint", help="Judge: an OpenAI-compatible base URL.")
@click.option("--judge-api-model", help="Judge: the model name the endpoint serves.")
@click.option(
    "--ratings",
    "rating_names",
    multiple=True,
    help="Judge ratings 1-10 from the rubric: helpfulness (Help and Harm-Help), "
    "analysis_quality, guidance_quality, or all. Repeatable; needs a judge.",
)
@options.plan()
@options.prompt_routing()
@click.option(
    "--max-new-tokens",
    default=256,
    show_default=True,
    help="Token budget of each chain (markers included).",
)
@click.option("--max-stage-tokens", help="64, or per stage: analysis=64,guidance=32")
@click.option(
    "--batch-size", default=8, show_default=True, help="Prompts generated together."
)
@click.option("--limit", type=int, help="Only the first N prompts of each set.")
@click.option("--temperature", type=float, help="Sample (default: greedy).")
@click.option(
    "--repetition-penalty",
    type=float,
    help="HF repetition_penalty for every model, e.g. 1.2 (default: off).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    help="Seed of sampling and of the random prompt expert.",
)
@options.model_loading
def evaluate(
    prompt_sets,
    adapters,
    base_model,
    include_base,
    compare_files,
    output,
    scorer,
    rubric,
    judge_model,
    judge_endpoint,
    judge_api_model,
    rating_names,
    plan,
    prompt_routing,
    max_new_tokens,
    max_stage_tokens,
    batch_size,
    limit,
    temperature,
    repetition_penalty,
    seed,
    dtype,
    device,
    device_map,
    load_in_4bit,
) -> None:
    """Harmless / compliance / robustness rates, tokens per stage and stage plans."""
    from axolotl_mote.datagen import build_generator
    from axolotl_mote.evaluation import (
        GenOptions,
        build_scorer,
        evaluate_models,
        load_prompt_set,
        load_rubric,
        merge_results,
        write_report,
    )
    from axolotl_mote.evaluation.ratings import Rater, load_ratings

    if compare_files:
        paths = write_report(merge_results(list(compare_files)), output)
        click.echo(f"wrote {paths['md']}")
        return
    if not prompt_sets:
        raise click.UsageError("give at least one --prompts [kind=]path")
    try:
        sets = [load_prompt_set(p, limit=limit) for p in prompt_sets]
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"two prompt sets share a file name: {names}")
        loading = options.loading_kwargs(dtype, device, device_map, load_in_4bit)
        specs = _models(base_model, adapters, include_base, loading)
        for spec in specs:
            if spec.adapter:
                options.check_plans([plan], spec.adapter)
                options.check_prompt_routing(prompt_routing, spec.adapter)
        rubric_data = load_rubric(rubric)
        rating_specs = load_ratings(rubric_data, rating_names) if rating_names else []
        judge = None
        if scorer == "judge" or rating_specs:
            if not (judge_model or judge_endpoint):
                raise ValueError(
                    "the judge scorer and --ratings need a judge: --judge-model PATH "
                    "or --judge-endpoint URL with --judge-api-model NAME"
                )
            judge = build_generator(
                judge_model,
                endpoint=judge_endpoint,
                api_model=judge_api_model,
                batch_size=batch_size,
                **options.loading_kwargs(dtype, device, None, False),
            )
        score = build_scorer(
            scorer,
            rubric_data,
            **({"generator": judge, "seed": seed} if scorer == "judge" else {}),
        )
        rater = Rater(judge, rating_specs, seed=seed) if rating_specs else None
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from err
    opts = GenOptions(
        max_new_tokens=max_new_tokens,
        max_stage_tokens=options.stage_limits(max_stage_tokens),
        plan=plan,
        prompt_routing=prompt_routing,
        batch_size=batch_size,
        seed=seed,
        temperature=temperature,
        repetition_penalty=repetition_penalty,
    )
    results = evaluate_models(specs, sets, score, output, opts, rater=rater)
    click.echo((Path(output) / "results.md").read_text(encoding="utf-8"))
    click.echo(
        f"wrote {output}/results.json, results.md, rates.png, tokens_per_stage.png, "
        f"stage_plans.png, generations/ ({len(results['models'])} model(s))"
    )
