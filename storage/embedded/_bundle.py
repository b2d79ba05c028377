"""The PostgreSQL programs bundled by the ``pgserver`` wheel: where they are, which major."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

from tickguard.storage.embedded._errors import EmbeddedDatabaseError

# Deterministic server behaviour whatever the host's locale and time zone.
SERVER_ENV = {"LC_ALL": "C", "TZ": "UTC"}


def bin_dir() -> Path:
    """The directory of the bundled server's programs (postgres, initdb, pg_ctl, pg_dump,
    pg_restore, psql). Does not import pgserver (its import has side effects we do not need).

    Raises ``EmbeddedDatabaseError`` when pgserver is not installed."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedDatabaseError("the pgserver package (the bundled PostgreSQL) is missing")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def server_major_version() -> str:
    """The bundled PostgreSQL's major version, e.g. ``"16"``, as PG_VERSION spells it.

    Runs ``postgres --version`` and waits for it."""
    out = subprocess.run(
        [str(bin_dir() / "postgres"), "--version"],
        check=True,
        capture_output=True,
        text=True,
        env=SERVER_ENV,
    ).stdout
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if match is None:
        raise EmbeddedDatabaseError(f"cannot read the bundled PostgreSQL version from {out!r}")
    return match.group(1)
