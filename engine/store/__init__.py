"""The workspace on disk and its one writer's records: the folder layout, the lock, state files and
their quarantine, the event log, the queue's jobs, checkpoints, model versions, bases, snapshots and
rollbacks. Whatever a process reads back after a crash is defined here.
"""
