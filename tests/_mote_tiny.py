"""A tiny MoTE model with random (non-zero) experts and marker rows, built in code.

Shared by the generation and export tests: the tiny Llama from ``conftest``, resized for
the markers, one PEFT LoRA with MoTE rank blocks on every linear layer, random ``lora_B``
(PEFT initialises it to zero, which would make every expert a no-op).
"""

from __future__ import annotations

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_mote(
    model_dir,
    tokenizer,
    template,
    *,
    r: int = 4,
    lora_alpha: int = 8,
    prompt_routing: str = "shared",
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    train_markers: bool = False,
    seed: int = 0,
    task_type: str | None = None,
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_mote.tokens import marker_ids
    from axolotl_mote.tuner.config import MoteConfig
    from axolotl_mote.tuner.model import attach_mote

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))
    ids = marker_ids(tokenizer, template)
    with torch.no_grad():
        for weight in (
            base.get_input_embeddings().weight,
            base.get_output_embeddings().weight,
        ):
            weight[ids] = torch.randn(len(ids), weight.shape[1]) * 0.5
    config = MoteConfig(
        stage_names=[s.name for s in template.trained_stages],
        expert_rank=r,
        prompt_routing=prompt_routing,
        template=template.name,
        template_data=template.model_dump(mode="json", exclude={"source"}),
    )
    extra = {}
    if train_markers:
        extra["trainable_token_indices"] = {"embed_tokens": sorted(ids)}
    lora = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=TARGETS,
        use_rslora=use_rslora,
        task_type=task_type,
        **config.peft_kwargs(lora_alpha, use_rslora, rank_pattern, alpha_pattern),
        **extra,
    )
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
            elif "trainable_tokens_delta" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    attach_mote(model, config)
    model.eval()
    return model, config
