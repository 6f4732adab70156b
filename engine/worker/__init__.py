"""The training worker: one job in its own process, wrapping the Hugging Face Trainer.

Only this package imports torch and transformers. Its entry is
`python -m engine.worker --events-fd N` (see __main__.py); the daemon talks to
it through engine.core.protocol only. Importing this package itself is cheap: the
heavy imports live in the modules that need them.
"""
