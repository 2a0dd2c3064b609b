"""Automatic routing: derive each forward's step ids from its input ids.

Training sets the routing state explicitly (``routing.route``). Generation cannot: the
step of a new token depends on the markers the model has emitted so far. A
:class:`AutoRouting` installs forward hooks on the model's entry points that, before
each forward, ask a :class:`~axolotl_mote.generation.router.StageRouter` for the step
ids of the input and set them on the routing state for that one forward
(``RoutingState.set(..., auto=True)``); after the forward it clears them.

Entry points: the transformers model (``generate`` calls it) and the PEFT wrapper,
whose ``forward`` reaches the inner model through ``.forward`` and so skips the inner
hooks; a plain ``PeftModel`` calls the inner module, so both fire and the second one
sees its input already routed. Explicit routing wins: inside ``route(...)`` the hooks
only check that the step ids fit the input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from axolotl_mote.routing import RoutingError, RoutingState, start_position

Resolver = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]


class AutoRouting:
    """Forward hooks that route every forward of a model by a resolver."""

    def __init__(self, model: Any, state: RoutingState, resolver: Resolver) -> None:
        from axolotl_mote.tuner.model import inner_model

        self.state = state
        self.resolver = resolver
        self._input: torch.Tensor | None = None  # the input routed by this call
        self._handles: list[Any] = []
        inner = inner_model(model)
        for target in {id(model): model, id(inner): inner}.values():
            self._handles.append(
                target.register_forward_pre_hook(self._before, with_kwargs=True)
            )
            self._handles.append(target.register_forward_hook(self._after))
        state.attachments.add(self)

    def _before(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        state = self.state
        if state.is_set and not state.is_auto:  # explicit routing: check, keep
            steps = state.step_ids
            ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if ref is not None and tuple(steps.shape) != tuple(ref.shape[:2]):
                raise RoutingError(
                    f"step_ids {tuple(steps.shape)} do not match the input "
                    f"{tuple(ref.shape[:2])}"
                )
            return None
        if input_ids is None:
            return None
        if state.is_auto and self._input is input_ids:
            return None  # nested entry point of the same call: already routed
        steps = self.resolver(input_ids, kwargs)
        # a decode step continues the KV cache: the fast path's packed blocks of this
        # sequence stay valid (weights cannot change inside one generate call)
        state.set(steps, auto=True, same_sequence=start_position(kwargs) > 0)
        self._input = input_ids
        return None

    def _after(self, module, args, output):
        if self.state.is_auto:
            self.state.clear(end_sequence=False)  # the next decode step reuses packs
            self._input = None
        return None

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.state.attachments.discard(self)
        if self.state.is_auto:
            self.state.clear()


def auto_routing(model: Any) -> AutoRouting | None:
    """The automatic routing installed on ``model``, if any."""
    from axolotl_mote.tuner.model import get_routing_state

    state = get_routing_state(model)
    return state.attachments.find(AutoRouting)


def install(model: Any, resolver: Resolver) -> AutoRouting:
    """Route every later forward of ``model`` by ``resolver`` (replacing any other)."""
    from axolotl_mote.tuner.model import get_routing_state

    current = auto_routing(model)
    if current is not None:
        current.remove()
    return AutoRouting(model, get_routing_state(model), resolver)


def uninstall(model: Any) -> None:
    """Remove the automatic routing of ``model`` (no-op if none)."""
    current = auto_routing(model)
    if current is not None:
        current.remove()


@contextlib.contextmanager
def routed_by(model: Any, resolver: Resolver) -> Iterator[AutoRouting]:
    """Automatic routing by ``resolver`` inside the block; the previous one after."""
    from axolotl_mote.tuner.model import get_routing_state

    state = get_routing_state(model)
    if state.is_set and state.is_auto:
        state.clear()  # left over by a forward that raised
    if state.is_set:
        raise RuntimeError(
            "the routing state already holds explicit step ids; generate outside "
            "`route(...)` so the markers decide the routing"
        )
    previous = auto_routing(model)
    previous_resolver = previous.resolver if previous is not None else None
    routing = install(model, resolver)
    try:
        yield routing
    finally:
        routing.remove()
        state.clear()
        if previous_resolver is not None:
            install(model, previous_resolver)
