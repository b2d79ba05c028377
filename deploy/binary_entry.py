"""The entry point PyInstaller freezes into ``dist/tickguard``: the ``tickguard`` command.

It is ``tickguard.cli:main`` and nothing more, so the binary and the installed console script
behave alike; the build (deploy/tickguard.spec) adds what the frozen program cannot find on
its own: the embedded PostgreSQL, the SQL migrations, and the demo dashboard when built.
"""

import sys

from tickguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
