"""What every part of traind shares and nothing else: durable writes, typed configuration, the
daemon-worker protocol, hashing, reading input files, host resources. It imports no other engine package.
"""
