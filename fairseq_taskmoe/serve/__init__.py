"""taskmoe-serve: every pair of a task-MoE over HTTP, each through its own pruned sub-network.

routes.py (direct / pivot / zero-shot), registry.py (build, cache, load, evict sub-networks),
engines.py (CTranslate2 / fairseq), batcher.py (cross-request batching), service.py (a request
from texts to translations), text.py (sentence splitting, HTML), keys.py (API keys, rate limits),
metrics.py (Prometheus), app.py (the HTTP layer); the command is fairseq_taskmoe/cli/serve.py.

The top of the package, with cli/: builds on moe/ (routing kinds, pairs), distributed/
(checkpoint files), integration/ (config, safe loading), deploy/ (pruning, export), hub.py and
ct2.py (engines); nothing below imports it.
"""
