"""The web console in a real headless browser: router.py as its own process, dcmtk's storescu sending, storescp
destinations, Debian's chromium driven by Playwright. The page loads, its counts follow what is sent, an action
without the token is refused, and a correction made through the page reaches the corrected label's destination
and the corrections dataset.

Skips where Playwright, chromium or dcmtk is missing (CI installs them: apt-get install chromium dcmtk;
requirements-dev.txt has playwright; the browser is Debian's, no Playwright download). With
ROUTER_CONSOLE_SCREENSHOT=docs/console.png the overview page is also saved there (the README's screenshot).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

from .conftest import (
    CLASSES,
    assert_same_object,
    free_port,
    needs_dcmtk,
    received_files,
    start_router,
    start_storescp,
    storescu,
    wait_for,
    write_config,
)

playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser")) if p and Path(p).is_file()), None)
pytestmark = [needs_dcmtk, pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed "
                                                                      "(apt-get install chromium)")]

TOKEN = "browser-test-token-0123456789"
REBOUND = "rebound.example"  # an attacker's name that resolves to the console's address (DNS rebinding)
TIMEOUT_MS = 60_000


@pytest.fixture
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                                          f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"])
        try:
            yield browser
        finally:
            browser.close()


def test_console_in_a_browser_counts_refuses_and_corrects(processes, browser, samples, model_file, tmp_path,
                                                          monkeypatch):
    expect = playwright_api.expect
    ports = {name: free_port() for name in ("router", "console", "good", "spine")}
    folders = {name: tmp_path / name for name in ("good", "spine")}
    start_storescp(processes, folders["good"], "GOOD", ports["good"])
    start_storescp(processes, folders["spine"], "SPINE", ports["spine"])
    good = {"ae_title": "GOOD", "host": "127.0.0.1", "port": ports["good"]}
    destinations = {**{c: good for c in CLASSES}, "uncertain": good,
                    "spine": {"ae_title": "SPINE", "host": "127.0.0.1", "port": ports["spine"]}}
    config = write_config(tmp_path / "router.yaml", port=ports["router"], spool=tmp_path / "spool", model=model_file,
                          destinations=destinations, console={"port": ports["console"]})
    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", TOKEN)  # the router process inherits it
    start_router(processes, config, tmp_path / "router.log")
    console = f"http://127.0.0.1:{ports['console']}"

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    response = page.goto(console + "/")
    assert response.status == 200, (tmp_path / "router.log").read_text()[-4000:]  # the server's traceback, if any
    expect(page.locator('[data-count-state="forwarded"]')).to_have_text("0")

    storescu(sorted(s.path for s in samples.values()), ports["router"], tmp_path)
    delivered = sum(s.label != "unreadable" for s in samples.values())
    quarantined = len(samples) - delivered
    # the live part of the page reloads itself: the counts follow without a reload
    expect(page.locator('[data-count-state="forwarded"]')).to_have_text(str(delivered), timeout=TIMEOUT_MS)
    expect(page.locator('[data-count-state="quarantined"]')).to_have_text(str(quarantined), timeout=TIMEOUT_MS)
    expect(page.locator('[data-count-label="uncertain"]')).to_have_text(
        str(sum(s.label == "uncertain" for s in samples.values())))
    expect(page.locator("#latest img.thumb").first).to_be_visible()
    # thumbnails served and decoded; asked from the test's side (page.evaluate is not subject to the page's CSP, which
    # forbids the string evaluation wait_for_function does in the page) and again after each live refresh
    def thumbnails_shown() -> bool:
        try:
            return page.evaluate("() => { const t = Array.from(document.querySelectorAll('#latest img.thumb'));"
                                 " return t.length > 0 && t.every(i => i.complete && i.naturalWidth > 0); }")
        except playwright_api.Error:  # the live part was being replaced: ask again
            return False

    wait_for(thumbnails_shown, TIMEOUT_MS / 1000, "the thumbnails to be shown")
    shot = Path(os.environ.get("ROUTER_CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    page.screenshot(path=str(shot), full_page=False)

    uncertain = next(s for s in samples.values() if s.label == "uncertain")
    page.goto(console + "/review")
    row = page.locator(f'tr[data-sop="{uncertain.sop_instance_uid}"]')
    expect(row).to_have_count(1)
    row.locator("select").select_option("spine")
    row.locator("button[name=correct]").click()  # not logged in
    expect(page.locator("#refused")).to_contain_text("log in")
    corrections = tmp_path / "spool" / "corrections" / "labels.csv"
    assert not corrections.exists()

    page.goto(console + "/login")
    page.fill("input[name=name]", "alice")
    page.fill("input[name=token]", TOKEN)
    page.click("main form[action='/login'] button")
    expect(page).to_have_url(console + "/review")
    row = page.locator(f'tr[data-sop="{uncertain.sop_instance_uid}"]')
    row.locator("select").select_option("spine")
    row.locator("button[name=correct]").click()
    expect(page.locator("#message")).to_contain_text("corrected to spine")
    expect(page.locator(f'tr[data-sop="{uncertain.sop_instance_uid}"]')).to_have_count(0)  # off the review list

    wait_for(lambda: uncertain.sop_instance_uid in received_files(folders["spine"]), 60,
             "the corrected object to reach spine's destination")
    rows = list(csv.DictReader(corrections.open()))
    assert [(r["sop_instance_uid"], r["label"], r["previous_label"], r["who"]) for r in rows] == [
        (uncertain.sop_instance_uid, "spine", "uncertain", "alice")]
    assert_same_object(corrections.parent / rows[0]["path"], uncertain.path)

    # another site's page posts a logout form and a correction to the console: refused (its Origin; and the
    # SameSite=Strict cookie is not sent), the operator is still logged in, nothing corrected
    attacker = "http://attacker.example"
    for target in ("/logout", "/items/1/correct"):
        form = (f'<form id="f" method="post" action="{console}{target}"><input name="csrf" value="guess">'
                f'<input name="label" value="adult_chest"></form>'
                f'<script>document.getElementById("f").submit()</script>')
        page.route(attacker + "/**", _serving(form))
        page.goto(attacker + "/")
        expect(page.locator("#refused")).to_contain_text("another site")
        page.unroute(attacker + "/**")
    page.goto(console + "/review")
    expect(page.locator("header")).to_contain_text("alice")
    assert len(list(csv.DictReader(corrections.open()))) == 1
    # a page whose name was rebound to 127.0.0.1 reads nothing: the console refuses that Host
    rebound = page.goto(f"http://{REBOUND}:{ports['console']}/search?q={uncertain.sop_instance_uid}")
    assert rebound.status == 400 and uncertain.sop_instance_uid not in page.content()


def _serving(html: str):
    """A Playwright route handler answering ``html`` (one parameter: with two, Playwright passes the request)."""
    def handler(route):
        route.fulfill(content_type="text/html", body=html)
    return handler
