"""The machine and the outside world: GPUs (NVML), memory estimates, worker subprocesses and the fork
server, Prometheus metrics, alert hooks, the systemd unit.
"""
