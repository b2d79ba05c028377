"""``python -m tickguard.sim``: run the simulator (same as ``tickguard sim``)."""

import sys

from tickguard.sim.cli import main

sys.exit(main())
