"""What every part of traind shares: durable writes, typed configuration, the daemon-worker protocol,
hashing, reading input files, and the host's resources (memory, disk, GPUs through NVML). It imports no
other engine package.
"""
