"""Loading models outside Axolotl: a base model, or a base model with a MoTE adapter.

>>> model, tokenizer = load_mote_model("base/model", "outputs/mote")   # doctest: +SKIP

``load_mote_model`` is ``PeftModel.from_pretrained`` on the resized base model,
followed by ``attach_mote`` with the adapter's own ``mote_config.json``. Inside Axolotl
the same happens through ``lora_model_dir`` (the plugin attaches in ``post_lora_load``).

Every loader of this package goes through here, and none runs a MoTE adapter unrouted:
:func:`load_model` routes a MoTE adapter, and :func:`load_base_model` refuses a folder
that holds one (transformers would otherwise load it as a plain LoRA, every expert on
every token). Outside the package, a plain ``PeftModel.from_pretrained`` of a MoTE
adapter warns: its adapter_config.json carries a key PEFT does not know,
``mote_routed_adapter__load_with_axolotl_mote_load_mote_model``, which PEFT names in
its "Unexpected keyword arguments" warning (``tuner.config.mark_routed_adapter``).

Big models: ``dtype="auto"`` (bf16 where the GPU supports it, fp32 on CPU),
``device_map`` (e.g. ``"auto"``: shard over the visible GPUs) and ``load_in_4bit``
(an NF4 base through bitsandbytes, which also has a CPU backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from axolotl_mote.constants import MOTE_CONFIG_NAME

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: Any = "auto", device: str | None = None):
    """A torch dtype from a name; ``"auto"`` = bf16 on a CUDA device that supports it,
    else fp32 (CPU kernels are fastest and exact in fp32)."""
    import torch

    if dtype is None or dtype == "auto":
        cuda = torch.cuda.is_available() and not str(device or "cuda").startswith("cpu")
        return (
            torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        )
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {DTYPES}")
    return getattr(torch, dtype)


def resolve_device(device: str | None = None) -> str:
    """``device``, or ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def is_mote_adapter(path: str | Path) -> bool:
    return (Path(path) / MOTE_CONFIG_NAME).is_file()


def _model_kwargs(dtype, device, device_map, load_in_4bit) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device)}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
        kwargs["device_map"] = device_map or {"": resolve_device(device)}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


def load_base_model(
    path: str | Path,
    *,
    dtype: Any = "auto",
    device: str | None = None,
    device_map: Any = None,
    load_in_4bit: bool = False,
):
    """A plain causal LM (no MoTE). Refuses a MoTE adapter folder with the fix."""
    from transformers import AutoModelForCausalLM

    if is_mote_adapter(path):
        raise ValueError(
            f"{path} is a MoTE adapter: loading it as a plain model would run it "
            "unrouted (every expert on every token). Load it with "
            "axolotl_mote.load_mote_model(BASE_MODEL, ADAPTER) or pass it as --adapter"
        )
    kwargs = _model_kwargs(dtype, device, device_map, load_in_4bit)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to(resolve_device(device))
    return model.eval()


def load_mote_tokenizer(adapter_dir: str | Path, base_model: str | Path | None = None):
    """The tokenizer saved with the adapter (markers included), else base + markers."""
    from transformers import AutoTokenizer

    from axolotl_mote.markers import add_marker_tokens
    from axolotl_mote.tuner.config import MoteConfig

    adapter_dir = Path(adapter_dir)
    has_own = (adapter_dir / "tokenizer_config.json").exists()
    source = adapter_dir if has_own else base_model
    if source is None:
        raise ValueError(
            f"{adapter_dir} has no tokenizer; pass base_model so the markers can be "
            "added"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    add_marker_tokens(tokenizer, MoteConfig.load(adapter_dir).prompt_template())
    return tokenizer


def load_mote_model(
    base_model: str | Path | Any,
    adapter_dir: str | Path,
    *,
    tokenizer: Any = None,
    is_trainable: bool = False,
    dtype: Any = "auto",
    device: str | None = None,
    device_map: Any = None,
    load_in_4bit: bool = False,
    torch_dtype: Any = None,
):
    """Base model + MoTE adapter with routing attached; returns (model, tokenizer).

    ``base_model``: a path, or an already loaded model (then ``dtype``/``device``
    options do not apply). ``torch_dtype`` is the old name of ``dtype``.
    """
    import warnings

    from peft import PeftModel

    from axolotl_mote.tuner.config import MoteConfig, quiet_routed_adapter_warning
    from axolotl_mote.tuner.model import attach_mote

    adapter_dir = Path(adapter_dir)
    if not is_mote_adapter(adapter_dir):
        raise FileNotFoundError(
            f"{adapter_dir} has no {MOTE_CONFIG_NAME}: it is not a MoTE adapter (an "
            "exported per-stage adapter is a plain LoRA: PeftModel.from_pretrained)"
        )
    config = MoteConfig.load(adapter_dir)
    base_path = base_model if isinstance(base_model, (str, Path)) else None
    if tokenizer is None:
        tokenizer = load_mote_tokenizer(adapter_dir, base_path)
    if base_path is not None:
        model = load_base_model(
            base_path,
            dtype=torch_dtype if torch_dtype is not None else dtype,
            device=device,
            device_map=device_map,
            load_in_4bit=load_in_4bit,
        )
    else:
        model = base_model
    rows = config.vocab_size or len(tokenizer)
    if model.get_input_embeddings().num_embeddings < rows:
        # the new rows' values come from the adapter (trainable tokens): no mean init
        model.resize_token_embeddings(rows, mean_resizing=False)
    with warnings.catch_warnings():  # the routed-adapter mark: routed right below
        quiet_routed_adapter_warning()
        model = PeftModel.from_pretrained(
            model, str(adapter_dir), is_trainable=is_trainable
        )
    attach_mote(model, config)
    if not is_trainable:
        model.eval()
    return model, tokenizer


def load_model(
    base_model: str | Path,
    adapter: str | Path | None = None,
    **kwargs: Any,
):
    """(model, tokenizer) for ``base_model`` alone or with a MoTE ``adapter``.

    The one entry point the CLI and evaluation use: a MoTE adapter is always routed; a
    ``base_model`` folder that is itself a MoTE adapter is refused.
    """
    from transformers import AutoTokenizer

    if adapter is not None:
        return load_mote_model(base_model, adapter, **kwargs)
    model = load_base_model(base_model, **kwargs)
    return model, AutoTokenizer.from_pretrained(base_model)
