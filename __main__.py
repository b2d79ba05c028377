import sys

from tickguard.cli import main

sys.exit(main())
