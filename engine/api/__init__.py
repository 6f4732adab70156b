"""How any shell or client reaches a workspace: the control socket, the status document, and the
event and log followers behind `traind events` and `traind logs`.
"""
