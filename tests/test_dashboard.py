"""The demo dashboard's built files, served by tickguard itself."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from web_harness import make_settings, running_app

from tickguard.actors.mailbox import Mailbox
from tickguard.storage import Database
from tickguard.web import dashboard
from tickguard.web.app import AppServices


def services(db: Database) -> AppServices:
    return AppServices(make_settings(), db, Mailbox("persistence"), Mailbox("fanout"))


async def test_built_dashboard_is_served_at_the_root(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = tmp_path / "dist"
    (built / "assets").mkdir(parents=True)
    (built / "index.html").write_text('<!doctype html><script src="./assets/app-1a2b.js"></script>')
    (built / "assets" / "app-1a2b.js").write_text("console.log('tickguard')")
    (tmp_path / "secret.txt").write_text("not for you")
    monkeypatch.setattr(dashboard, "CANDIDATES", (tmp_path / "missing", built))
    async with running_app(services(db)) as url, httpx.AsyncClient(base_url=url) as client:
        page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "./assets/app-1a2b.js" in page.text
        script = await client.get("/assets/app-1a2b.js")
        assert script.status_code == 200 and script.text == "console.log('tickguard')"
        assert "max-age=31536000" in script.headers["cache-control"]
        escape = await client.get("/assets/..%2Fsecret.txt")
        assert escape.status_code == 404 and "not for you" not in escape.text
        assert (await client.get("/api/positions/closed?userId=u")).status_code == 200


async def test_without_a_build_the_root_says_how_to_build_it(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard, "CANDIDATES", (tmp_path / "missing",))
    async with running_app(services(db)) as url, httpx.AsyncClient(base_url=url) as client:
        page = await client.get("/")
    assert page.status_code == 404
    assert "make demo-build" in page.json()["error"]
