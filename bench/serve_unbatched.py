"""``python -m bench.serve_unbatched serve``: tickguard with the persistence actor's grouping
turned off (``max_batch=1``: one request per transaction), for the REST benchmark's
comparison only.

The knob is not a setting of the product (``PersistenceConfig.max_batch`` has no environment
variable), so this entry point substitutes the config class's default before the tree is
built. Nothing else differs from ``tickguard serve``.
"""

from __future__ import annotations

import functools
import sys

from tickguard.actors import persistence


def main() -> int:
    # build_tree looks PersistenceConfig up on the module each time it builds the tree.
    persistence.PersistenceConfig = functools.partial(  # type: ignore[misc]
        persistence.PersistenceConfig, max_batch=1
    )
    from tickguard.cli import main as tickguard_main

    return tickguard_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
