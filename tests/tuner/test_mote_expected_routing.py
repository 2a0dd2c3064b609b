"""Expected prompt routing, at an alpha where the weights tell the formulas apart.

``prompt_routing: expected`` is the expected value of random routing: each of the E
step experts at w / E (w = alpha with a shared expert, else 1), the shared expert at
1 - alpha. The coefficients below are written out by hand for alpha = 0.3 and E = 3, so
a step expert weighted at alpha (0.3) instead of alpha / E (0.1), or the shared expert
at alpha instead of 1 - alpha, fails here and not only in a serving test.
"""

from __future__ import annotations

import pytest
import torch

from axolotl_mote.routing import RoutingState
from tests.helpers.tiny import P, X

CPU = torch.device("cpu")

# (case id, state kwargs, coefficients of the tokens [P, 0, 1, 2, X], written by hand)
CASES = [
    (
        "shared-alpha0.3",
        {"alpha": 0.3, "shared_expert": True},
        [
            [0.1, 0.1, 0.1, 0.7],
            [0.3, 0.0, 0.0, 0.7],
            [0.0, 0.3, 0.0, 0.7],
            [0.0, 0.0, 0.3, 0.7],
            [0.0, 0.0, 0.0, 0.0],
        ],
    ),
    (
        "shared-alpha0.8",
        {"alpha": 0.8, "shared_expert": True},
        [
            [0.8 / 3, 0.8 / 3, 0.8 / 3, 0.2],
            [0.8, 0.0, 0.0, 0.2],
            [0.0, 0.8, 0.0, 0.2],
            [0.0, 0.0, 0.8, 0.2],
            [0.0, 0.0, 0.0, 0.0],
        ],
    ),
    (
        "no-shared",
        {"alpha": 0.3, "shared_expert": False},
        [
            [1 / 3, 1 / 3, 1 / 3],
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0],
        ],
    ),
]


@pytest.mark.parametrize(
    "kwargs, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_expected_prompt_routing_weights_each_step_expert_at_w_over_e(kwargs, expected):
    state = RoutingState(num_experts=3, prompt_routing="expected", **kwargs)
    state.set(torch.tensor([[P, 0, 1, 2, X]]))
    coef = state.coefficients(torch.float32, CPU)[0]  # [5, n_blocks]
    torch.testing.assert_close(coef, torch.tensor(expected), rtol=0, atol=1e-6)
    # the expected row is the mean of the three routed rows (what "expected" means)
    torch.testing.assert_close(coef[0], coef[1:4].mean(0), rtol=0, atol=1e-6)
