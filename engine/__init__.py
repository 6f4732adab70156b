"""traind's engine: the daemon, its queue and workspace, and the training worker.

Its packages, each importing only the ones after it (docs/architecture.md; import-linter checks it): cli,
supervisor (the daemon), api, cluster, tools and worker (the training process), ops, quality, data, store (the
workspace on disk), core. Nothing outside `engine.worker` may import torch, transformers or textual: the daemon
must start fast and outlive any worker.
"""

__version__ = "0.1.0"
