"""Tiny models and batches for the routed-LoRA tests (torch + transformers + peft only).

Everything is built in code, fp32, on CPU, in well under a second: a 2-layer Llama
of hidden size 32, MoTE attached to every linear layer through PEFT, and a packed batch
whose rows mix stages, prompt runs and padding.
"""

from __future__ import annotations

import copy

import torch

from axolotl_mote.constants import PAD_STEP, PROMPT_STEP
from axolotl_mote.tiny import random_llama
from axolotl_mote.tuner.config import MoteConfig
from axolotl_mote.tuner.reference import NaiveMoteLinear, split_blocks

STAGES = ["analysis", "guidance", "answer"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96
P, X = PROMPT_STEP, PAD_STEP

# Two packed rows of 16 tokens (several samples per row) and their position ids.
# Row 0: two packed samples, each a prompt run followed by stages, then padding.
# Row 1: one prompt run, stages 0 and 2 only, a second sample starting mid-row.
PACKED_STEPS = torch.tensor(
    [
        [P, P, P, 0, 0, 1, 2, 2, P, P, 0, 1, 1, 2, X, X],
        [P, P, 0, 0, 0, 2, 2, 2, 2, P, P, P, 2, 2, 2, X],
    ]
)
PACKED_POSITIONS = torch.tensor(
    [
        [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 0, 0],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 0],
    ]
)


def tiny_llama(seed: int = 0, attn_implementation: str = "eager"):
    """A random fp32 2-layer Llama (hidden 32, GQA) in eval mode, built by the
    package's one tiny builder (``axolotl_mote.tiny``, which also saves one to disk for
    ``axolotl train``)."""
    return (
        random_llama(
            VOCAB,
            seed=seed,
            hidden_size=32,
            intermediate_size=48,
            max_position_embeddings=64,
            attn_implementation=attn_implementation,
        )
        .float()
        .eval()
    )


def loss_and_grads(model, **inputs):
    """One forward and backward from zeroed gradients: (loss, {name: gradient})."""
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    params = model.named_parameters()
    return loss.detach(), {n: p.grad.clone() for n, p in params if p.grad is not None}


def mote_config(**overrides) -> MoteConfig:
    kwargs = {"stage_names": list(STAGES), "expert_rank": 4}
    kwargs.update(overrides)
    return MoteConfig(**kwargs)


def lora_config(
    config: MoteConfig,
    lora_alpha: float = 8.0,
    use_rslora: bool = False,
    rank_pattern=None,
    alpha_pattern=None,
    **lora_extra,
):
    """The PEFT LoraConfig the plugin builds: rank blocks through peft_kwargs()."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.expert_rank,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        use_rslora=use_rslora,
        target_modules=list(TARGETS),
        **lora_extra,
        **config.peft_kwargs(
            lora_alpha=lora_alpha,
            use_rslora=use_rslora,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        ),
    )


def mote_model(
    config: MoteConfig,
    base=None,
    lora_alpha: float = 8.0,
    use_rslora: bool = False,
    randomize: bool = True,
    seed: int = 1,
    **lora_kwargs,
):
    """(PEFT model with MoTE attached, its routing state, an untouched base copy)."""
    from peft import get_peft_model

    from axolotl_mote.tuner.model import attach_mote

    base = tiny_llama() if base is None else base
    pristine = copy.deepcopy(base)
    lora = lora_config(config, lora_alpha, use_rslora, **lora_kwargs)
    model = get_peft_model(base, lora)
    if randomize:
        randomize_lora(model, seed)
    state = attach_mote(model, config)
    return model, state, pristine


def lora_layers(model):
    """``{name: lora.Linear}`` of every PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def randomize_lora(model, seed: int = 1, scale: float = 0.2) -> None:
    """PEFT inits B to zero (the delta would vanish); give A and B random values."""
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            weight.copy_(torch.randn(weight.shape, generator=gen) * scale)


def expert_weights(layer, config: MoteConfig):
    """Per-expert (A_k, B_k) lists and the shared (A, B) of one PEFT layer (clones)."""
    a = layer.lora_A["default"].weight.detach().clone()
    b = layer.lora_B["default"].weight.detach().clone()
    return split_blocks(a, b, config.n_blocks, config.shared_expert)


def naive_model(pristine, peft_model, config: MoteConfig):
    """The base model with every target linear replaced by the naive per-expert loop.

    Each ``NaiveMoteLinear`` holds *separate* parameters copied from the rank blocks, so
    its forward and backward share nothing with the rank-mask path.
    """
    model = copy.deepcopy(pristine)
    peft_layers = {
        n.split("base_model.model.", 1)[-1]: m
        for n, m in lora_layers(peft_model).items()
    }
    naive = {}
    for name, layer in peft_layers.items():
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        ea, eb, sa, sb = expert_weights(layer, config)
        rank = layer.r["default"] // config.n_blocks  # lora_rank_pattern may vary it
        module = NaiveMoteLinear(
            base,
            config.num_experts,
            rank,
            layer.scaling["default"],
            config.alpha,
            shared=config.shared_expert,
        )
        with torch.no_grad():
            for k in range(config.num_experts):
                module.a[k].copy_(ea[k])
                module.b[k].copy_(eb[k])
            if config.shared_expert:
                module.shared_a.copy_(sa)
                module.shared_b.copy_(sb)
        for p in base.parameters():
            p.requires_grad_(False)
        setattr(parent, child, module)
        naive[name] = module
    for p in model.parameters():
        p.requires_grad_(False)
    for module in naive.values():
        for name, p in module.named_parameters():
            if not name.startswith("base."):
                p.requires_grad_(True)
    return model, naive


def set_expert_ids(naive: dict, expert_ids: torch.Tensor) -> None:
    for module in naive.values():
        module.expert_ids = expert_ids


def input_ids_for(steps: torch.Tensor, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, steps.shape, generator=gen)


def prompt_experts_from_state(state, steps: torch.Tensor) -> torch.Tensor:
    """Expert drawn for each prompt token under random routing (read off the state).

    Only used for ``prompt_routing: random``, whose draws are the implementation's; the
    tests check separately that every prompt run gets exactly one step expert.
    """
    coef = state.coefficients(torch.float32, torch.device("cpu"))  # [B, T, n_blocks]
    return coef[..., : state.num_experts].argmax(-1)  # [B, T]


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
    """The saved tiny Llama of ``model_dir`` with ``template``'s markers, as a MoTE
    model.

    The vocabulary is resized for the markers and their rows randomised (so stages are
    distinguishable), then :func:`mote_model` attaches MoTE with random ``lora_B`` (and
    random marker-row deltas with ``train_markers``). Returns ``(model, MoteConfig)``.
    """
    from transformers import AutoModelForCausalLM

    from axolotl_mote.markers import marker_ids

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))
    ids = marker_ids(tokenizer, template)
    with torch.no_grad():
        for emb in (base.get_input_embeddings(), base.get_output_embeddings()):
            emb.weight[ids] = torch.randn(len(ids), emb.weight.shape[1]) * 0.5
    config = MoteConfig(
        stage_names=[s.name for s in template.trained_stages],
        expert_rank=r,
        prompt_routing=prompt_routing,
        template=template.name,
        template_data=template.model_dump(mode="json", exclude={"source"}),
    )
    extra = {"task_type": task_type}
    if train_markers:  # both rows, as the plugin trains them on an untied head
        extra["trainable_token_indices"] = {
            "embed_tokens": sorted(ids),
            "lm_head": sorted(ids),
        }
    model, _, _ = mote_model(
        config,
        base=base,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        randomize=False,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        **extra,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
            elif "trainable_tokens_delta" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    model.eval()
    return model, config


def aligncot_mote(model_dir, **kwargs):
    """:func:`build_mote` with the aligncot template and the saved tokenizer of
    ``model_dir`` (markers added): ``(model, tokenizer, template, config)``. The
    setup most generation, evaluation and serving tests start from."""
    from transformers import AutoTokenizer

    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.templates import load_template

    template = load_template("aligncot")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    add_marker_tokens(tokenizer, template)
    model, config = build_mote(model_dir, tokenizer, template, **kwargs)
    return model, tokenizer, template, config


def saved_aligncot_mote(model_dir, adapter, **kwargs):
    """:func:`aligncot_mote` saved to ``adapter`` as the plugin saves it (weights,
    tokenizer, MoTE config) and loaded back through ``load_mote_model``, the path
    users take: ``(adapter, model, tokenizer)``."""
    from axolotl_mote.loading import load_mote_model

    model, tokenizer, _, config = aligncot_mote(model_dir, **kwargs)
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    config.save(adapter)
    model, tokenizer = load_mote_model(model_dir, adapter, dtype="float32",
                                       device="cpu")  # fmt: skip
    return adapter, model, tokenizer


#: Tiny configs of the architectures the plugin is tested on (through axolotl train).
#: Each brings its own layout: q/k/v bias (Qwen2), q/k norms (Qwen3), tied and
#: soft-capped logits (Gemma2), fused qkv_proj/gate_up_proj (Phi-3), fused
#: query_key_value with an untied ``embed_out`` head (GPT-NeoX).
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 16, "tie_word_embeddings": True, "query_pre_attn_scalar": 16},
    ),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5, "use_parallel_residual": True}),
}


def save_tiny_architecture(name: str, out_dir, tokenizer, seed: int = 0):
    """Save a randomly initialised 2-layer ``name`` model sized to ``tokenizer``."""
    import transformers

    cls_name, extra = ARCHITECTURES[name]
    torch.manual_seed(seed)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    if name == "gpt_neox":  # its own names for the sizes
        common.pop("num_key_value_heads")
    common.update(extra)
    config = getattr(transformers, cls_name)(**common)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
