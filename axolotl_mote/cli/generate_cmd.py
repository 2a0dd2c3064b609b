"""``axolotl-mote generate``: stage-routed generation from a trained MoTE adapter."""

from __future__ import annotations

import json
from pathlib import Path

import click

from axolotl_mote.cli import options


def resolve_base_model(
    base_model: str | None, config: str | None, adapter: Path | None
) -> str:
    """``--base-model``, else the config's ``base_model``, else the adapter's own."""
    if base_model:
        return base_model
    if config:
        cfg = options.read_yaml(config)
        if cfg.get("base_model"):
            return str(cfg["base_model"])
    peft_config = adapter / "adapter_config.json" if adapter else None
    if peft_config is not None and peft_config.is_file():
        name = json.loads(peft_config.read_text()).get("base_model_name_or_path")
        if name:
            return str(name)
    raise click.UsageError(
        "no base model: pass --base-model or --config with base_model"
    )


def resolve_adapter(adapter: str | None, config: str | None) -> Path:
    """``--adapter``, else the config's ``lora_model_dir`` or ``output_dir``."""
    if adapter:
        return Path(adapter)
    if config:
        cfg = options.read_yaml(config)
        for key in ("lora_model_dir", "output_dir"):
            if cfg.get(key):
                return Path(cfg[key])
    raise click.UsageError("no adapter: pass --adapter (the trained output_dir)")


def read_inputs(prompts: tuple[str, ...], input_file: str | None) -> list[dict]:
    records = [{"prompt": p} for p in prompts]
    if input_file:
        from axolotl_mote.data.schema import ChainRecordError, iter_jsonl

        try:
            for number, record in iter_jsonl(input_file):
                if isinstance(record, str):
                    record = {"prompt": record}
                if not isinstance(record, dict) or not (
                    "prompt" in record or "messages" in record
                ):
                    raise click.ClickException(
                        f"{input_file}:{number}: a record needs `prompt` or `messages`"
                    )
                records.append(record)
        except ChainRecordError as err:
            raise click.ClickException(str(err)) from None
    if not records:
        raise click.UsageError("nothing to generate: give --prompt or --input")
    return records


def base_answers(
    base: str,
    conversations,
    max_new_tokens: int,
    loading: dict,
    repetition_penalty: float | None = None,
):
    """The base model's plain greedy answers (no adapter, its own chat template),
    with the same repetition penalty as the MoTE answers so the two compare fairly."""
    import torch

    from axolotl_mote.loading import load_model

    model, tok = load_model(base, **loading)
    device = next(model.parameters()).device
    answers = []
    for messages in conversations:
        inputs = tok.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(device)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
                repetition_penalty=repetition_penalty,
            )
        answers.append(
            tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


@click.command()
@options.config("The Axolotl YAML (base_model, output_dir).")
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Trained MoTE adapter folder.",
)
@options.base_model("Base model (default: the config's, else the adapter's).")
@click.option("--prompt", "prompts", multiple=True, help="A user message (repeatable).")
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True, dir_okay=False),
    help="JSONL of {prompt | messages, [plan], [id]} records.",
)
@options.output("Write one JSON result per line here.", required=False)
@options.plan()
@click.option(
    "--max-new-tokens",
    default=256,
    show_default=True,
    help="Token budget of each chain (markers included).",
)
@click.option("--max-stage-tokens", help="64, or per stage: analysis=64,guidance=32")
@click.option(
    "--stop-after-answer/--no-stop-after-answer",
    default=True,
    show_default=True,
    help="Stop a chain when its answer stage ends.",
)
@click.option(
    "--fallback",
    type=click.Choice(["answer", "none"]),
    default="answer",
    show_default=True,
    help="Force the answer stage if the model skips it.",
)
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="Sample at this temperature (default: greedy), as evaluate and generate-data.",
)
@click.option(
    "--top-p", type=float, default=None, help="Nucleus mass when sampling (0-1]."
)
@click.option(
    "--repetition-penalty",
    type=float,
    default=None,
    help="HF repetition_penalty, e.g. 1.2 (small models loop under greedy).",
)
@click.option(
    "--batch-size", default=8, show_default=True, help="Prompts generated together."
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of sampling and of the random prompt expert.",
)
@options.prompt_routing()
@options.model_loading
@click.option(
    "--compare-base",
    is_flag=True,
    help="Also print the base model's own answer to each prompt.",
)
def generate(
    config,
    adapter,
    base_model,
    prompts,
    input_file,
    output,
    plan,
    max_new_tokens,
    max_stage_tokens,
    stop_after_answer,
    fallback,
    temperature,
    top_p,
    repetition_penalty,
    batch_size,
    seed,
    prompt_routing,
    dtype,
    device,
    device_map,
    load_in_4bit,
    compare_base,
) -> None:
    """Generate reasoning chains, routed stage by stage, and print each stage."""
    import torch
    from tqdm import tqdm

    from axolotl_mote.generation import generate_chains, split_plan
    from axolotl_mote.loading import load_mote_model

    records = read_inputs(prompts, input_file)
    adapter_dir = resolve_adapter(adapter, config)
    base = resolve_base_model(base_model, config, adapter_dir)
    loading = options.loading_kwargs(dtype, device, device_map, load_in_4bit)
    limits = options.stage_limits(max_stage_tokens)
    try:
        plans = [split_plan(r["plan"]) if "plan" in r else plan for r in records]
    except (ValueError, TypeError) as err:
        raise click.BadParameter(str(err), param_hint="a record's plan") from None
    options.check_plans(plans, adapter_dir)
    options.check_prompt_routing(prompt_routing, adapter_dir)
    torch.manual_seed(seed)
    try:
        model, tokenizer = load_mote_model(base, adapter_dir, **loading)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    gen_kwargs = {
        k: v
        for k, v in (
            ("temperature", temperature),
            ("top_p", top_p),
            ("repetition_penalty", repetition_penalty),
        )
        if v
    }
    with tqdm(
        total=len(records),
        desc="generating",
        unit="prompt",
        disable=len(records) < 2,
    ) as bar:
        try:
            outputs = generate_chains(
                model,
                tokenizer,
                records,
                plan=plans,
                max_new_tokens=max_new_tokens,
                max_stage_tokens=limits,
                stop_after_answer=stop_after_answer,
                fallback=fallback,
                batch_size=batch_size,
                do_sample=bool(temperature),
                progress=bar.update,
                prompt_routing=prompt_routing,
                **gen_kwargs,
            )
        except ValueError as err:  # a plan or stage the template does not have
            raise click.UsageError(str(err)) from None
    answers = (
        base_answers(
            base,
            [o.messages for o in outputs],
            max_new_tokens,
            loading,
            repetition_penalty,
        )
        if compare_base
        else [None] * len(outputs)
    )
    sink = open(output, "w", encoding="utf-8") if output else None
    try:
        for record, out, base_answer in zip(records, outputs, answers):
            if sink:
                row = {"id": record.get("id"), **out.to_dict()}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            click.echo("=" * 78)
            click.echo(f"PROMPT: {out.messages[-1]['content']}")
            forced = "   (answer forced by fallback)" if out.fallback_used else ""
            stages = " > ".join(out.plan) or "none"
            click.echo(f"stages: {stages}   finish: {out.finish_reason}{forced}")
            if base_answer is not None:
                click.echo(f"  [base model] {base_answer.strip()}")
            for name, text in out.stages.items():
                n = out.tokens_per_stage[name]
                click.echo(f"  [{name}] ({n} tokens) {text.strip()}")
    finally:
        if sink:
            sink.close()
    if output:
        click.echo(f"wrote {len(outputs)} results to {output}")
