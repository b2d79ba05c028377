"""tickguard's Coinbase-protocol simulator (``tickguard sim``): see ``server.Simulator``."""

from tickguard.sim import paths
from tickguard.sim.cli import main
from tickguard.sim.server import Simulator, encode_frame, format_time, open_simulator

__all__ = ["Simulator", "encode_frame", "format_time", "main", "open_simulator", "paths"]
