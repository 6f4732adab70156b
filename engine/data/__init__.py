"""Input files: which inbox entries may be taken, the accepted formats, validation, duplicates, and
the demo's generated data. Nothing here trains or runs a worker.
"""
