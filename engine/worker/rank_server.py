"""What the ranks' fork server imports (engine/worker/launch.py), so that N ranks pay the imports once, not N times.

The agent starts its ranks from multiprocessing's fork server, a process with
no threads that imports this module and then forks one process per rank: a
fork of the agent's process where that has torch imported and no threads
(launch.fork_rank_server), else a fresh python.
It ignores SIGTERM: a stop goes to the whole process group, and the server
must outlive its ranks to report their exit codes to the agent (each rank sets
its own handlers before it trains; the server leaves when the agent does).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)

from engine.worker import __main__, train  # noqa: E402,F401  (the slow part: torch, transformers, the Trainer)
