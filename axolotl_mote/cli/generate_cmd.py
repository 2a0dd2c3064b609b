"""``axolotl-mote generate``: stage-routed generation from a trained MoTE adapter."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _stage_limits(value: str | None):
    """``64`` -> 64 for every stage; ``analysis=64,guidance=32`` -> per stage."""
    if not value:
        return None
    if "=" not in value:
        return int(value)
    return {k.strip(): int(v) for k, v in (p.split("=", 1) for p in value.split(","))}


def _plan(value):
    """A CLI/record plan: adaptive -> None, full, or a list of stage names/keys."""
    if value is None or isinstance(value, list) or value in ("adaptive", "full"):
        return None if value == "adaptive" else value
    return [p.strip() for p in str(value).replace(">", ",").split(",") if p.strip()]


def _base_model(base_model: str | None, config: str | None, adapter: Path) -> str:
    if base_model:
        return base_model
    if config:
        import yaml

        cfg = yaml.safe_load(Path(config).read_text()) or {}
        if cfg.get("base_model"):
            return str(cfg["base_model"])
    peft_config = adapter / "adapter_config.json"
    if peft_config.is_file():
        name = json.loads(peft_config.read_text()).get("base_model_name_or_path")
        if name:
            return str(name)
    raise click.UsageError(
        "no base model: pass --base-model or --config with base_model"
    )


def _adapter_dir(adapter: str | None, config: str | None) -> Path:
    if adapter:
        return Path(adapter)
    if config:
        import yaml

        cfg = yaml.safe_load(Path(config).read_text()) or {}
        for key in ("lora_model_dir", "output_dir"):
            if cfg.get(key):
                return Path(cfg[key])
    raise click.UsageError("no adapter: pass --adapter (the trained output_dir)")


def _read_inputs(prompts: tuple[str, ...], input_file: str | None) -> list[dict]:
    records = [{"prompt": p} for p in prompts]
    if input_file:
        with open(input_file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise click.ClickException(f"{input_file}:{number}: {err}") from err
                if isinstance(record, str):
                    record = {"prompt": record}
                if "prompt" not in record and "messages" not in record:
                    raise click.ClickException(
                        f"{input_file}:{number}: a record needs `prompt` or `messages`"
                    )
                records.append(record)
    if not records:
        raise click.UsageError("nothing to generate: give --prompt or --input")
    return records


def _base_answers(
    base: str,
    conversations,
    max_new_tokens: int,
    dtype: str,
    device: str,
    repetition_penalty: float | None = None,
):
    """The base model's plain greedy answers (no adapter, its own chat template), with
    the same repetition penalty as the MoTE answers so the two compare fairly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model.to(device).eval()
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
@click.option(
    "--config", type=click.Path(exists=True), help="The Axolotl YAML (base_model)."
)
@click.option(
    "--adapter", type=click.Path(exists=True), help="Trained MoTE adapter dir."
)
@click.option(
    "--base-model", help="Base model (default: config's, else the adapter's)."
)
@click.option("--prompt", "prompts", multiple=True, help="A user message (repeatable).")
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True),
    help="JSONL of {prompt | messages, [plan], [id]} records.",
)
@click.option(
    "--output", type=click.Path(), help="Write one JSON result per line here."
)
@click.option(
    "--plan",
    default="adaptive",
    show_default=True,
    help="adaptive | full | stages, e.g. analysis>answer (a record's `plan` wins).",
)
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--max-stage-tokens", help="64, or per stage: analysis=64,guidance=32")
@click.option(
    "--stop-after-answer/--no-stop-after-answer", default=True, show_default=True
)
@click.option(
    "--fallback",
    type=click.Choice(["answer", "none"]),
    default="answer",
    show_default=True,
    help="Force the answer stage if the model skips it.",
)
@click.option("--do-sample", is_flag=True)
@click.option("--temperature", type=float, default=None)
@click.option("--top-p", type=float, default=None)
@click.option(
    "--repetition-penalty",
    type=float,
    default=None,
    help="HF repetition_penalty, e.g. 1.2 (small models loop under greedy).",
)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--device", default=None, help="cpu, cuda, cuda:1… (default: cuda if available)"
)
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
    do_sample,
    temperature,
    top_p,
    repetition_penalty,
    batch_size,
    seed,
    dtype,
    device,
    compare_base,
) -> None:
    """Generate reasoning chains, routed stage by stage, and print each stage."""
    import torch
    from tqdm import tqdm

    from axolotl_mote.generation import generate_chains
    from axolotl_mote.loading import load_mote_model
    from axolotl_mote.tuner.config import MoteConfig
    from axolotl_mote.tuner.model import get_routing_state

    records = _read_inputs(prompts, input_file)
    adapter_dir = _adapter_dir(adapter, config)
    base = _base_model(base_model, config, adapter_dir)
    torch.manual_seed(seed)
    model, tokenizer = load_mote_model(
        base, adapter_dir, torch_dtype=getattr(torch, dtype)
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    get_routing_state(model).mote_config = MoteConfig.load(adapter_dir)
    plans = [_plan(r.get("plan", plan)) for r in records]
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
        total=len(records), desc="generating", unit="prompt", disable=len(records) < 2
    ) as bar:
        outputs = generate_chains(
            model,
            tokenizer,
            records,
            plan=plans,
            max_new_tokens=max_new_tokens,
            max_stage_tokens=_stage_limits(max_stage_tokens),
            stop_after_answer=stop_after_answer,
            fallback=fallback,
            batch_size=batch_size,
            do_sample=do_sample,
            progress=bar.update,
            **gen_kwargs,
        )
    base_answers = (
        _base_answers(
            base,
            [o.messages for o in outputs],
            max_new_tokens,
            dtype,
            device,
            repetition_penalty,
        )
        if compare_base
        else [None] * len(outputs)
    )
    sink = open(output, "w", encoding="utf-8") if output else None
    try:
        for record, out, base_answer in zip(records, outputs, base_answers):
            if sink:
                row = {"id": record.get("id"), **out.to_dict()}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            click.echo("=" * 78)
            click.echo(f"PROMPT: {out.messages[-1]['content']}")
            click.echo(
                f"stages: {' > '.join(out.plan) or 'none'}   finish: {out.finish_reason}"
                + ("   (answer forced by fallback)" if out.fallback_used else "")
            )
            if base_answer is not None:
                click.echo(f"  [base model] {base_answer.strip()}")
            for name, text in out.stages.items():
                click.echo(
                    f"  [{name}] ({out.tokens_per_stage[name]} tokens) {text.strip()}"
                )
    finally:
        if sink:
            sink.close()
    if output:
        click.echo(f"wrote {len(outputs)} results to {output}")
