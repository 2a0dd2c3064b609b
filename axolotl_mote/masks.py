"""Step skipping (the paper's p_dropout) as attention masks: pure functions of a batch.

MoTE trains one chain ``question, analysis, guidance, answer`` per example, yet wants
the model to also handle chains that skip intermediate stages. Rather than materialising
every skipped variant as its own sequence (the paper's D_extra, Appendix B), each
example draws which stages to *hide*, and the attention mask cuts later tokens off from
them.

Semantics (decided here; docs/step_skipping.md has pictures):

* **Unit of sampling.** Per sequence (an example; a packed row holds several) and per
  hideable stage present in it, independently: hidden with probability ``p``. The draw
  is one ``torch.rand`` of shape ``[B, S+1, E]`` from the caller's generator, so a batch
  draws the same stages for the same seed. ``p == 1`` hides every hideable stage
  present.
* **What hiding means.** Every token *after* a hidden stage in its sequence that is not
  one of that stage's own tokens (later stages, but also ``mode: context`` / prompt
  tokens that follow it) cannot attend to it. Since all later tokens are cut off,
  nothing about the hidden tokens can reach them indirectly: the answer's loss has an
  *exactly zero* gradient with respect to a hidden stage (tests/test_masks_model.py
  checks it).
* **Always visible.** Question (``PROMPT_STEP``) tokens before the chain, and a stage's
  own tokens. The answer stage is never hideable (the template forbids ``skippable`` on
  it, and ``runtime.hideable_steps`` rejects it in ``skip_stages``).
* **Markers.** With ``markers_visible`` the hidden stage's start/end marker tokens stay
  visible and only its content is hidden. To keep the hiding exact, those visible
  markers do not attend to the hidden content either (otherwise the end marker's states
  would carry it to every later token): later stages see ``<|analysis|><|/analysis|>``,
  an empty stage, which is what inference sees when the model opens and immediately
  closes a stage.
* **Packing and padding.** Tokens attend only within their own sequence. Sequences come
  from ``position_ids`` resets (0 starts a sequence) and/or Axolotl's segment-id
  ``attention_mask`` (1,1,2,2,0); padding is ``step_ids == PAD_STEP`` or a 0 in the 2D
  mask, left or right. A padding query attends only to itself, so no softmax row is
  empty (an all-masked row gives NaN in some kernels, and NaN * 0 is still NaN in the
  backward).
* **Positions.** ``shift`` gives every token ``position - (number of earlier tokens of
  its sequence that it cannot see)``: exactly the position it would have with the hidden
  tokens absent. A hidden stage keeps its own positions (it sees itself), unless an
  earlier stage is hidden from it too. ``keep`` leaves positions alone.
* **p == 0** returns the very ``inputs`` dict (same objects): training is bitwise plain
  causal training. With ``p > 0`` every batch gets the explicit mask, even when nothing
  was drawn, so one run never switches between two kernels' numerics.

Backends (verified against transformers 5.16 ``masking_utils``: a 4D ``attention_mask``,
or a ``BlockMask``, is returned as-is by ``create_causal_mask`` and reaches the
attention function unchanged): ``sdpa`` takes the boolean ``[B, 1, T, T]`` mask (True =
attend); ``eager`` *adds* the mask to the scores, so it gets an additive float mask (0 /
dtype min) — a boolean mask would be silently wrong there; ``flex_attention`` gets a
``BlockMask`` built from per-token tensors. Flash attention takes no mask: it runs the
same draw as regions through its variable-length kernel (``attention.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from axolotl_mote.constants import PAD_STEP

#: Attention implementations that can take a step-skipping mask.
SUPPORTED_ATTN = ("sdpa", "eager", "flex_attention")


class StepSkipError(ValueError):
    """Step skipping cannot run with this batch or attention implementation."""


# --- sequences and draws -------------------------------------------------------------
def sequence_ids(
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    step_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence number of every token, ``[B, T]`` long: 1, 2, … per row; 0 = padding.

    A sequence starts at the first token of a row, wherever ``position_ids`` is 0, and
    wherever Axolotl's segment-id ``attention_mask`` changes value. Padding is a 0 in
    ``attention_mask`` or ``PAD_STEP`` in ``step_ids``. Without ``position_ids`` and
    with a binary mask each row is one sequence.

        position_ids   [[0, 1, 2, 0, 1, 0]]      attention_mask [[1, 1, 1, 2, 2, 0]]
        -> [[1, 1, 1, 2, 2, 0]]                  -> [[1, 1, 1, 2, 2, 0]]
    """
    ref = next(t for t in (step_ids, attention_mask, position_ids) if t is not None)
    if ref.dim() != 2:
        raise StepSkipError(f"expected [B, T] tensors, got shape {tuple(ref.shape)}")
    B, T = ref.shape[0], ref.shape[-1]
    pad = torch.zeros(B, T, dtype=torch.bool, device=ref.device)
    starts = torch.zeros(B, T, dtype=torch.bool, device=ref.device)
    starts[:, 0] = True
    if position_ids is not None:
        starts |= position_ids.expand(B, T) == 0
    if attention_mask is not None:
        seg = attention_mask.long()  # [B, T]
        pad |= seg == 0
        starts[:, 1:] |= seg[:, 1:] != seg[:, :-1]
    if step_ids is not None:
        pad |= step_ids == PAD_STEP
    # a pad run between packed sequences must not glue the next one onto the previous
    starts[:, 1:] |= pad[:, :-1] & ~pad[:, 1:]
    starts &= ~pad
    seq = torch.cumsum(starts.long(), dim=1)  # [B, T]
    return seq.masked_fill(pad, 0)


def sample_hidden_stages(
    step_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    hideable: list[int],
    p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Draw the hidden stages: bool ``[B, S+1, E]``, True = stage e of sequence s
    hidden.

    ``S`` = the largest sequence number, ``E = max(hideable) + 1``. Only stages in
    ``hideable`` that are present in the sequence can be True; row ``s = 0`` (padding)
    is always False. One ``torch.rand`` on the generator's device, then moved to the
    batch.
    """
    if any(int(h) < 0 for h in hideable):
        raise StepSkipError(f"hideable step ids must be >= 0, got {hideable}")
    B = step_ids.shape[0]
    S = int(seq_ids.max()) if seq_ids.numel() else 0
    E = max(int(h) for h in hideable) + 1
    device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.rand((B, S + 1, E), generator=generator, device=device)  # [B, S+1, E]
    hidden = (draw < p).to(step_ids.device)
    allowed = torch.zeros(E, dtype=torch.bool, device=step_ids.device)
    allowed[torch.tensor(sorted(set(hideable)), device=step_ids.device)] = True
    present = torch.zeros(B, S + 1, E, dtype=torch.bool, device=step_ids.device)
    valid = (step_ids >= 0) & (step_ids < E) & (seq_ids > 0)  # [B, T]
    b_idx = torch.arange(B, device=step_ids.device)[:, None].expand_as(step_ids)
    present[b_idx[valid], seq_ids[valid], step_ids[valid]] = True
    return hidden & present & allowed


def hidden_tokens(
    step_ids: torch.Tensor, seq_ids: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """Bool ``[B, T]``: the token belongs to a stage drawn hidden in its sequence."""
    B, S1, E = hidden.shape
    valid = (step_ids >= 0) & (step_ids < E) & (seq_ids > 0)  # [B, T]
    flat = seq_ids.clamp(0, S1 - 1) * E + step_ids.clamp(0, E - 1)  # [B, T]
    return hidden.reshape(B, S1 * E).gather(1, flat) & valid


def _token_roles(
    step_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    hidden: torch.Tensor,
    is_marker: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden content, visible marker of a hidden stage), both bool ``[B, T]``."""
    in_hidden = hidden_tokens(step_ids, seq_ids, hidden)
    if is_marker is None:
        return in_hidden, torch.zeros_like(in_hidden)
    vis_marker = in_hidden & is_marker.bool()
    return in_hidden & ~vis_marker, vis_marker


# --- masks ---------------------------------------------------------------------------
def build_step_skip_mask(
    step_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    hidden: torch.Tensor,
    is_marker: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, T, T]`` (True = query i may attend to key j).

    ``is_marker`` (bool ``[B, T]``) marks tokens kept visible when their stage is hidden
    (the stage markers, for ``skip_markers_visible``); None hides whole stages.
    """
    B, T = step_ids.shape
    content, vis_marker = _token_roles(step_ids, seq_ids, hidden, is_marker)
    ar = torch.arange(T, device=step_ids.device)
    causal = ar[None, :] <= ar[:, None]  # [T, T]  j <= i
    real = seq_ids > 0  # [B, T]
    same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & real[:, None, :]  # [B, T, T]
    other = (
        step_ids[:, :, None] != step_ids[:, None, :]
    )  # [B, T, T]  query vs key stage
    blocked = content[:, None, :] & (other | vis_marker[:, :, None])  # [B, T, T]
    allowed = causal & same & ~blocked
    # padding queries see only themselves: no empty softmax row
    allowed |= (
        torch.eye(T, dtype=torch.bool, device=step_ids.device) & ~real[:, :, None]
    )
    return allowed[:, None]  # [B, 1, T, T]


def reference_step_skip_mask(
    step_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    hidden: torch.Tensor,
    is_marker: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive per-element version of :func:`build_step_skip_mask`, written from the
    spec."""
    B, T = step_ids.shape
    E = hidden.shape[2]
    s, q = step_ids.tolist(), seq_ids.tolist()
    mk = is_marker.tolist() if is_marker is not None else None
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                if q[b][i] == 0:  # padding query: itself only
                    out[b, 0, i, j] = i == j
                    continue
                if j > i or q[b][j] != q[b][i]:  # causal, own sequence only
                    continue
                sj = s[b][j]
                if 0 <= sj < E and bool(hidden[b, q[b][j], sj]):
                    if mk is None or not mk[b][j]:  # hidden content, not a kept marker
                        if s[b][i] != sj:  # any later token of another stage
                            continue
                        if mk is not None and mk[b][i]:  # the stage's visible marker
                            continue
                out[b, 0, i, j] = True
    return out.to(step_ids.device)


def shifted_position_ids(
    position_ids: torch.Tensor,
    step_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    hidden: torch.Tensor,
    is_marker: torch.Tensor | None = None,
) -> torch.Tensor:
    """``position_ids`` minus, per token, the earlier tokens of its sequence hidden from
    it.

    The count matches :func:`build_step_skip_mask` without building a ``[T, T]`` mask:
    per hideable stage e, an exclusive running count of e's hidden content since the
    start of the sequence, counted for queries of another stage (or e's visible
    markers).
    """
    B, T = step_ids.shape
    content, vis_marker = _token_roles(step_ids, seq_ids, hidden, is_marker)
    idx = torch.arange(T, device=step_ids.device).expand(B, T)
    starts = torch.ones_like(content)
    starts[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    start_idx = torch.cummax(torch.where(starts, idx, 0), dim=1).values  # [B, T]
    shift = torch.zeros(B, T, dtype=torch.long, device=step_ids.device)
    for e in range(hidden.shape[2]):
        hc = (content & (step_ids == e)).long()  # [B, T]
        before = torch.cumsum(hc, dim=1) - hc  # exclusive count in the row
        within = before - before.gather(1, start_idx)  # ... since the sequence began
        shift += within * ((step_ids != e) | vis_marker).long()
    shift = shift.masked_fill(seq_ids == 0, 0)
    return position_ids.expand(B, T) - shift.to(position_ids.dtype)


def positions_in_sequence(seq_ids: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 with every sequence (padding: 0), ``[B, T]``."""
    B, T = seq_ids.shape
    idx = torch.arange(T, device=seq_ids.device).expand(B, T)
    starts = torch.ones_like(seq_ids, dtype=torch.bool)
    starts[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    start_idx = torch.cummax(torch.where(starts, idx, 0), dim=1).values
    return (idx - start_idx).masked_fill(seq_ids == 0, 0)


def flex_block_mask(
    step_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    hidden: torch.Tensor,
    is_marker: torch.Tensor | None = None,
) -> Any:
    """The same mask as a flex-attention ``BlockMask``; the mask_mod reads [B, T]
    tensors."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = step_ids.shape
    content, vis_marker = _token_roles(step_ids, seq_ids, hidden, is_marker)
    step, seq = step_ids.long(), seq_ids.long()

    def mask_mod(b, h, q, kv):  # scalar tensors -> bool; same rule as above
        keep = (kv <= q) & (seq[b, q] == seq[b, kv]) & (seq[b, kv] > 0)
        blocked = content[b, kv] & ((step[b, q] != step[b, kv]) | vis_marker[b, q])
        return (keep & ~blocked) | ((seq[b, q] == 0) & (q == kv))

    return create_block_mask(mask_mod, B, None, T, T, device=step_ids.device)


# --- backends ------------------------------------------------------------------------
def _bool_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask  # sdpa: attn_mask True = attend


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # eager: attn_weights + attention_mask, like transformers' own eager_mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


#: attn_implementation -> dense bool mask to what that attention function expects.
DENSE_BACKENDS: Mapping[str, Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = {
    "sdpa": _bool_mask,
    "eager": _additive_mask,
}


def check_attn_implementation(attn_implementation: str) -> None:
    """Raise naming the alternatives if the implementation cannot take step masks."""
    if attn_implementation in SUPPORTED_ATTN:
        return
    why = (
        "flash attention runs step skipping only as regions (attention.py), which "
        "the plugin installs at model load; this model was not set up for them"
        if "flash" in attn_implementation
        else "it is not one whose mask format axolotl-mote knows"
    )
    raise StepSkipError(
        f"mote.step_skip_prob > 0 with attn_implementation: {attn_implementation}: "
        f"{why}; "
        f"use attn_implementation: sdpa, eager or flex_attention, or set "
        "mote.step_skip_prob: 0"
    )


@dataclass
class SkipDraw:
    """One batch's step-skipping draw, before it becomes a mask or regions."""

    step_ids: torch.Tensor  # [B, T] on the output device
    seq: torch.Tensor  # [B, T] sequence numbers (0 = padding)
    hidden: torch.Tensor  # [B, S+1, E] hidden stages
    is_marker: torch.Tensor | None  # [B, T] markers kept visible, or None
    position_ids: torch.Tensor | None  # [B, T] the batch's, on the output device


def draw_step_skipping(
    inputs: dict[str, Any],
    *,
    step_ids: torch.Tensor,
    hideable: list[int],
    p: float,
    generator: torch.Generator | None,
    marker_ids: set[int] | None,
    markers_visible: bool,
    device: torch.device | str | None = None,
) -> SkipDraw:
    """Check the batch and draw which stages each sequence hides."""
    device = torch.device(device) if device is not None else step_ids.device
    step_ids = step_ids.to(device)
    input_ids = inputs.get("input_ids")
    if input_ids is not None and tuple(input_ids.shape) != tuple(step_ids.shape):
        raise StepSkipError(
            f"step_ids {tuple(step_ids.shape)} do not match input_ids "
            f"{tuple(input_ids.shape)}"
        )
    attention_mask = inputs.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise StepSkipError(
            f"step skipping needs a 2D attention_mask (or none), got shape "
            f"{tuple(attention_mask.shape)}: the batch already carries a prepared mask"
        )
    position_ids = inputs.get("position_ids")
    position_ids = position_ids.to(device) if position_ids is not None else None
    seq = sequence_ids(
        position_ids,
        attention_mask.to(device) if attention_mask is not None else None,
        step_ids,
    )
    hidden = sample_hidden_stages(step_ids, seq, hideable, p, generator)
    is_marker = None
    if markers_visible and marker_ids:
        if input_ids is None:
            raise StepSkipError("skip_markers_visible needs input_ids in the batch")
        ids = torch.tensor(sorted(marker_ids), device=device)
        is_marker = torch.isin(input_ids.to(device), ids)
    return SkipDraw(step_ids, seq, hidden, is_marker, position_ids)


def _shifted(draw: SkipDraw) -> torch.Tensor:
    base = draw.position_ids
    if base is None:
        base = positions_in_sequence(draw.seq)
    return shifted_position_ids(
        base, draw.step_ids, draw.seq, draw.hidden, draw.is_marker
    )


def step_skipping(
    inputs: dict[str, Any],
    *,
    step_ids: torch.Tensor,
    hideable: list[int],
    p: float,
    generator: torch.Generator | None,
    marker_ids: set[int] | None,
    markers_visible: bool,
    shift_positions: bool,
    attn_implementation: str = "sdpa",
    regions: bool = False,
    mask_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[dict[str, Any], Any]:
    """A training batch with its step-skipping draw applied: ``(inputs, plan)``.

    The one entry point. ``p == 0`` or no hideable stage: ``(inputs, None)`` with the
    very dict, untouched. Otherwise a shallow copy, with shifted ``position_ids``
    (``shift_positions``; created per sequence when absent), and:

    * ``regions``: the attention mask untouched and the
      :class:`~axolotl_mote.attention.RegionPlan` to run the forward under (sdpa's
      ``mote_sdpa``, flash attention's varlen kernel);
    * else ``attention_mask`` replaced by the step mask in the format of
      ``attn_implementation`` (module docstring; ``mask_dtype`` is eager's dtype) and
      no plan. ``device`` is where outputs go (default ``step_ids``'s; a ``BlockMask``
      is not moved by the Trainer, so build it on the model's device).

    The same generator state draws the same stages either way: the dense masks are
    the reference the regions are tested against.
    """
    if p <= 0 or not hideable:
        return inputs, None
    if not regions:
        check_attn_implementation(attn_implementation)
    draw = draw_step_skipping(
        inputs, step_ids=step_ids, hideable=hideable, p=p, generator=generator,
        marker_ids=marker_ids, markers_visible=markers_visible, device=device,
    )  # fmt: skip
    out = dict(inputs)
    if shift_positions:
        out["position_ids"] = _shifted(draw)
    if regions:
        from axolotl_mote.attention import plan_regions

        # a visible marker of a hidden stage is cut off from its hidden content as
        # well, so it starts the next region: the content alone is the hidden span
        content, _ = _token_roles(draw.step_ids, draw.seq, draw.hidden, draw.is_marker)
        return out, plan_regions(draw.step_ids, draw.seq, content)
    args = (draw.step_ids, draw.seq, draw.hidden, draw.is_marker)
    if attn_implementation == "flex_attention":
        out["attention_mask"] = flex_block_mask(*args)
    else:
        mask = build_step_skip_mask(*args)
        out["attention_mask"] = DENSE_BACKENDS[attn_implementation](mask, mask_dtype)
    return out, None
