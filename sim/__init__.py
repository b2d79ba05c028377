"""tickguard's Coinbase-protocol simulator (``tickguard sim``): see ``server.Simulator``.

Modules: ``server`` (the Simulator), ``ws`` (WebSocket sessions), ``http`` (HTTP by h11),
``market_data`` (REST products/trades/candles), ``control`` (the control ops),
``rest_faults``, ``products`` (one product and its trades), ``paths`` (price paths),
``wire`` (time format, frames), ``cli``.
"""

from tickguard.sim import paths
from tickguard.sim.cli import main
from tickguard.sim.server import Simulator, encode_frame, format_time, open_simulator

__all__ = ["Simulator", "encode_frame", "format_time", "main", "open_simulator", "paths"]
