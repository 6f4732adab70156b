"""traind's engine: the daemon, its queue and workspace, and the training worker.

Nothing in this package outside `engine.worker` may import torch, transformers
or textual: the daemon must start fast and outlive any worker.
"""

__version__ = "0.1.0"
