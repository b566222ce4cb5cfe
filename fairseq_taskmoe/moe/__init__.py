"""The MoE core, in plain torch: nothing here imports fairseq (tests/test_layout.py imports every
module in a fresh process and checks), nor any other part of this package.

routing.py (gates -> RoutingDecision; frozen task routing), dispatch.py (group tokens by expert,
combine back), experts.py (expert FFNs; know nothing about routing), losses.py (load balancing,
z-loss), moe_layer.py (router + dispatch + experts -> (output, MoEStats)), task_merge.py (a
task's experts merged for inference), analysis.py (expert usage per pair over a data split),
pairs.py (which pairs a pruned or exported sub-network serves, the pair syntax and the
untrained-route rule: plain Python, no torch, so that taskmoe-serve's warm start needs none).

Used by distributed/, integration/, deploy/, serve/ and ct2.py; this __init__ imports nothing.
"""
