"""The daemon: one process per workspace, the single writer of its files. A passive state that only
the event loop mutates (state.py), and components that own their own (the attempt, the intake,
the snapshot task) and talk to the loop through narrow ports.
"""
