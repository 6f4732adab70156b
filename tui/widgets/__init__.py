"""traind's widgets, one a file; each owns its behaviour and reads only what the app hands it."""
