"""Task-level Mixture-of-Experts for multilingual MT, as a fairseq plugin.

Plain-torch modules (routing, dispatch, experts, losses, moe_layer, pruning) import no fairseq;
`fairseq_taskmoe.plugin` registers the fairseq model, task and criterion.
"""

__version__ = "0.1.0"
