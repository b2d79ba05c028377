"""The demo dashboard's built files, served at ``/`` when they exist.

The dashboard (``clients/react/demo``) builds to static files with relative asset paths and
calls the API on its own origin, so tickguard can serve it. Looked up, in order: the copy
packaged next to this module (``web/dashboard/``, which the single binary carries), then the
build output of a source checkout (``clients/react/demo/dist``). Without either, ``/`` answers
404 with a hint; the API is unaffected.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, send_from_directory

from tickguard.web.errors import ApiError

dashboard = Blueprint("dashboard", __name__)

_HERE = Path(__file__).resolve().parent
CANDIDATES = (_HERE / "dashboard", _HERE.parent / "clients" / "react" / "demo" / "dist")


def dashboard_dir() -> Path | None:
    """Where the built dashboard is, or None when it was not built."""
    for candidate in CANDIDATES:
        if (candidate / "index.html").is_file():
            return candidate
    return None


@dashboard.get("/")
async def index() -> Response:
    root = dashboard_dir()
    if root is None:
        raise ApiError(404, "The dashboard is not built: run `make demo-build`.")
    return await send_from_directory(root, "index.html")


@dashboard.get("/assets/<path:name>")
async def asset(name: str) -> Response:
    root = dashboard_dir()
    if root is None:
        raise ApiError(404, "Not found.")
    # send_from_directory refuses paths that leave the directory (404).
    response = await send_from_directory(root / "assets", name)
    response.cache_control.max_age = 31_536_000  # names carry a content hash
    response.cache_control.public = True
    return response
