"""The routing state in three parts: a frozen spec, per-forward step ids and the
attachments."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from axolotl_mote.routing import Attachments, RoutingSpec, RoutingState


def test_the_spec_is_frozen_and_reads_through():
    state = RoutingState(3, 0.3, True, "expected", seed=7)
    assert isinstance(state.spec, RoutingSpec)
    read = (state.num_experts, state.alpha, state.seed, state.n_blocks)
    assert read == (3, 0.3, 7, 4)
    assert state.prompt_routing == "expected" and state.prompt.step == -4
    with pytest.raises(AttributeError):
        state.alpha = 0.5  # the experts do not change while attached
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.spec.alpha = 0.5
    with pytest.raises(AttributeError):
        state.anything_new = 1  # closed: __slots__


def test_per_forward_state_leaves_the_spec_alone():
    state = RoutingState(3, 0.3, True, 1)
    spec = state.spec
    state.set(torch.tensor([[-2, 0, 1, 2, -1]]))
    coef = state.coefficients(torch.float32, torch.device("cpu"))[0]
    # prompt -> expert 1 at alpha, shared at 1 - alpha; padding: nothing
    assert coef[0].tolist() == pytest.approx([0.0, 0.3, 0.0, 0.7])
    assert coef[4].tolist() == [0.0, 0.0, 0.0, 0.0]
    state.clear()
    assert state.spec is spec and not state.is_set


def test_attachments_remove_every_handle_in_reverse():
    removed = []

    class Handle:
        def __init__(self, name):
            self.name = name

        def remove(self):
            removed.append(self.name)

    attachments = Attachments()
    first, second = attachments.add(Handle("a")), attachments.add(Handle("b"))
    assert attachments.find(Handle) is first
    attachments.discard(second)
    attachments.add(Handle("c"))
    attachments.remove_all()
    assert removed == ["c", "a"] and attachments.handles == []
