"""The daemon's dealings with the outside: worker subprocesses and the fork server, GPU memory estimates,
Prometheus metrics, alert hooks, the systemd unit.
"""
