"""traind's terminal UI: a client of the daemon. It never imports torch or transformers."""
