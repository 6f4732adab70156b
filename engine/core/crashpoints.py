"""Test-only named points at which a process kills itself with SIGKILL, for the chaos suite.

The `crash_at` switch (engine/core/testing.py) is `POINT:FLAG`: the first
process to reach POINT while the file FLAG exists removes FLAG and dies there,
as a kill -9 at exactly that moment would leave things. Off outside tests:
`reached` is one comparison.
"""

from __future__ import annotations

import os
import signal

from engine.core import testing

POINTS = ("claim", "checkpoint", "publish", "snapshot", "rollback")
# claim: a file renamed into queue/active/, its job.json not yet written
# checkpoint: a checkpoint's files saved, its marker not yet written (the worker)
# publish: a finished model renamed into models/, current.json not yet switched
# snapshot: a snapshot's manifest written in its temp folder, the folder not yet renamed
# rollback: the restored version made, current.json not yet switched
# shard: (sharding = "fsdp", not in the chaos suite's choice) one rank's shard of a checkpoint written, the
#        checkpoint not yet complete (the worker)
# export: (`traind export`, not in the chaos suite's choice) the export's temp folder complete, not yet renamed

_point, _, _flag = (testing.get("crash_at") or "").partition(":")


def reached(point: str) -> None:
    if point == _point and _flag:
        try:
            os.unlink(_flag)
        except FileNotFoundError:
            return  # fired already, in this process or another
        os.kill(os.getpid(), signal.SIGKILL)
