"""Commands that run a worker beside the queue, never through it: `traind export`, `traind eval`,
`traind preview`, `traind rebase`.
"""
