"""The TUI's screens: the main dashboard and the key help."""
