"""tickguard: the trading backend that closes take-profits and stop-losses server-side."""

__version__ = "0.1.0"
