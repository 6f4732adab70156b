"""Worker process entry: `python -m engine.worker --events-fd N` (one rank of several: engine/worker/launch.py).

Lifecycle, as the daemon drives it:
1. Ask the kernel for SIGTERM when the parent dies (prctl PDEATHSIG), and exit
   at once if the parent is already gone.
2. Import torch and transformers, then emit `ready`: the daemon may keep this
   *warm* worker waiting while the queue is empty.
3. Read one line from stdin (rank 0 under the launcher: its socket; the other
   ranks: the rendezvous store; engine/worker/link.py): the JobSpec. Send our
   own stdout/stderr to the job's worker.log. Later lines are control requests
   (pause, resume, checkpoint, stop, set_disk_reserve), read by a thread on
   rank 0; EOF means the daemon is gone, and is a stop.
4. Run the job and exit: EXIT_DONE; EXIT_INTERRUPTED after a stop request
   (SIGTERM/SIGINT/`stop`: checkpoint at the next step boundary, or at once if
   training had not begun); EXIT_ROLLBACK after an `anomaly` event (non-finite
   loss or gradient, loss spike: nothing of that step applied or saved);
   EXIT_CUDA_OOM after an `error` of kind "cuda_oom"; EXIT_GPU_UNAVAILABLE
   after one of kind "gpu_unavailable"; EXIT_MODEL_UNAVAILABLE after one of
   kind "model_unavailable" (the model or tokenizer could not be loaded);
   EXIT_FAILED after any other `error` event. Tracebacks go to the log.

PDEATHSIG fires when the *thread* that spawned us exits, not only the process:
the daemon must spawn workers from a thread that lives as long as it does.

This module owns the process (signals, file descriptors, exit codes); it never
trains and never writes files itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from engine.core import protocol
from engine.store.storage import LossyStream
from engine.worker.control import Commands, Interrupted, StopControl, die_with_parent
from engine.worker.errors import Anomaly, GpuUnavailable, ModelUnavailable, is_cuda_oom
from engine.worker.link import open_link

def redirect_output(log_path: str) -> None:
    """fd 1 and 2 (Trainer logs, tracebacks, C-level output) append to the job's log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    sys.stdout, sys.stderr = LossyStream(sys.stdout), LossyStream(sys.stderr)


def describe(error: BaseException) -> str:
    """One line for the user: data errors speak for themselves, others name their type."""
    if type(error).__name__ == "DataError":  # no import here: the failure may be that imports fail
        return str(error)
    return f"{type(error).__name__}: {error}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker", description="traind training worker (one job).")
    parser.add_argument("--events-fd", type=int, help="write JSON-lines events to this inherited fd (one process)")
    parser.add_argument("--channel", help="rank 0 under engine.worker.launch: the daemon's unix socket, for events "
                        "and control (the other ranks report nothing)")
    args = parser.parse_args(argv)

    if not die_with_parent():
        return protocol.EXIT_INTERRUPTED
    stop = StopControl().install()
    link = open_link(args.events_fd, args.channel)
    events = link.events
    spec = None
    try:
        import torch
        import transformers

        from engine.worker import train  # the slow part: torch, transformers, Trainer

        events.emit("ready", pid=os.getpid(), torch=torch.__version__, transformers=transformers.__version__,
                    cuda=torch.cuda.is_available(), threads=torch.get_num_threads())
        line = link.read_spec(stop)
        if not line.strip():
            print("traind-worker: the daemon went away before a job arrived", file=sys.stderr, flush=True)
            return protocol.EXIT_INTERRUPTED
        spec = protocol.JobSpec.from_json(line)
        redirect_output(spec.log_path)
        print(f"traind-worker: pid {os.getpid()} job {spec.job_id}: {spec.format} {spec.data_file}", flush=True)
        commands = Commands(stop, spec.disk_reserve)
        if link.control is not None:
            commands.start(link.control)
        return train.run_job(spec, events, stop, commands)
    except Interrupted as e:
        print(f"traind-worker: {e} before training started: exiting", flush=True)
        if spec is not None:
            events.emit("job_end", outcome="interrupted", step=None)
        return protocol.EXIT_INTERRUPTED
    except Anomaly as e:
        print(f"traind-worker: anomaly: {e.message}; nothing of step {e.step} applied or saved: roll back", flush=True)
        events.emit("anomaly", **e.event_fields())
        return protocol.EXIT_ROLLBACK
    except GpuUnavailable as e:
        traceback.print_exc()
        sys.stderr.flush()
        events.emit("error", message=str(e), kind="gpu_unavailable")
        return protocol.EXIT_GPU_UNAVAILABLE
    except ModelUnavailable as e:
        traceback.print_exc()
        sys.stderr.flush()
        events.emit("error", message=str(e), kind="model_unavailable")
        return protocol.EXIT_MODEL_UNAVAILABLE
    except Exception as e:
        traceback.print_exc()
        sys.stderr.flush()
        if is_cuda_oom(e):
            events.emit("error", message=describe(e), kind="cuda_oom")
            return protocol.EXIT_CUDA_OOM
        if type(e).__name__ == "DataError":
            events.emit("error", message=describe(e), kind="data")
        else:
            events.emit("error", message=describe(e))
        return protocol.EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
