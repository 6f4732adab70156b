"""Several machines: the head's view of its nodes, and `traind node`, the follower on each other machine.
"""
