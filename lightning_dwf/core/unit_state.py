"""What a dropped unit's parameter and optimizer state entries are set to.

A dropped unit (a weight whose D factors are zero, or a group whose gates and ω are zero) gets no gradient ever again,
so it stays zero as long as its momentum (SGD's buffer, Adam's first moment) is zero too. Its *second-moment* entries
(Adam's ``exp_avg_sq``, RMSprop's ``square_avg``, …) only divide a zero update and may hold any finite positive value;
they are set to 1 rather than 0 because torch's CPU ``sqrt`` of exact zeros is about 10× slower than of other values
(measured here, torch 2.13 CPU), which made every Adam step of a sparse model pay for its zeros. With no gradient they
decay (by β2 per step under Adam: float32 zero after about 87,000 steps at β2 = 0.999), so in very long runs the
speed-up fades; the results never depend on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

#: Optimizer state entries that only divide the update (second moments): a dropped unit's entries there become 1.
DENOMINATORS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg", "sum", "acc_delta"})


def unit_state(param: Tensor, states: Sequence[Mapping]) -> list[tuple[Tensor, float]]:
    """``(tensor, value of a dropped unit there)`` for ``param`` and every optimizer state tensor of its shape in
    ``states`` (``optimizer.state`` mappings): 0 for the parameter and momenta, 1 for second moments."""
    found: list[tuple[Tensor, float]] = [(param, 0.0)]
    for state in states:
        for key, value in state.get(param, {}).items():
            if isinstance(value, Tensor) and value.shape == param.shape:
                found.append((value, 1.0 if key in DENOMINATORS else 0.0))
    return found
