"""`python -m engine.cli`: the command line without the UI (the systemd unit runs the daemon this way)."""

import sys

from engine.cli import main

sys.exit(main())
