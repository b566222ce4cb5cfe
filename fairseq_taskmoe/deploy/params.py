"""Parameters a model holds in total and uses per token, from a checkpoint's state dict alone.

An MoE layer with U expert units of which each input uses k (top-k) runs k units per token, so
its active count is the layer's count minus (U - k) units. This covers the three forms a layer
takes here:

- full checkpoint (token, sentence or task routing): U = E experts, E - k of them idle per token;
- pruned, merged (taskmoe-prune): one FFN holding exactly the k experts the task uses, U = 1 <= k;
- pruned, unmerged for one task: U = k units, all active.

For a task-routed model the honest "active per token" figure is therefore the parameter count of
a pruned one-pair checkpoint (its routers are gone too); for token/sentence routing it is the full
count minus the idle experts. Expert units of one layer are assumed to be the same size.
"""

import re
from collections import defaultdict
from typing import Dict

from torch import Tensor

from .pruning import count_parameters

# <layer prefix>.experts.experts.<unit>.<fc1|fc2>.<weight|bias>
_UNIT_KEY = re.compile(r"^(?P<layer>.+)\.experts\.experts\.(?P<unit>\d+)\.fc[12]\.(weight|bias)$")


def expert_units(model_state: Dict[str, Tensor]) -> Dict[str, Dict[int, int]]:
    """{MoE layer prefix: {unit index: parameters of that unit}} of a state dict."""
    layers: Dict[str, Dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for key, value in model_state.items():
        m = _UNIT_KEY.match(key)
        if m:
            layers[m["layer"]][int(m["unit"])] += value.numel()
    return {name: dict(units) for name, units in layers.items()}


def active_parameters(model_state: Dict[str, Tensor], top_k: int) -> int:
    """Parameters one token goes through: the total minus (U - top_k) units per MoE layer that
    holds U > top_k expert units."""
    idle = 0
    for units in expert_units(model_state).values():
        if len(units) > top_k:
            per_unit = max(units.values())
            idle += (len(units) - top_k) * per_unit
    return count_parameters(model_state) - idle
