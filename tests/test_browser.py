"""The app in a real browser: Playwright driving Debian's Chromium against `python app.py` (tiny weights).

Every test also checks that the page logged no console errors and fetched nothing from outside the app.
None needs excusing: the theme uses system fonts (Gradio's default themes fetch Google Fonts, which fail
offline) and nothing else is loaded from elsewhere. Gradio does log a "Method not implemented." warning
from its own bundle; that is a warning, not an error, and is left alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

import app
from tests.app_server import running_app

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

SCREENSHOT = Path(__file__).resolve().parent / "artifacts" / "browser.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WAIT = {"timeout": 60_000}  # ms, for anything waiting on the server: the CPU may be shared with a training run


@pytest.fixture(scope="module")
def app_url(tiny_weights):
    with running_app(tiny_weights) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def problems() -> list[str]:
    """Console errors, uncaught exceptions and requests to other hosts, seen by the test's page."""
    return []


@pytest.fixture
def page(browser, app_url, problems):
    def on_request(request):
        if not request.url.startswith((app_url, "data:", "blob:")):
            problems.append(f"external request: {request.url}")

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("request", on_request)
    page.set_default_timeout(WAIT["timeout"])
    page.goto(app_url)
    expect(page.get_by_role("heading", name="Image captioner")).to_be_visible(**WAIT)
    yield page
    context.close()


def caption_text(page) -> str:
    return page.locator("#caption textarea").input_value()


def candidate_rows(page) -> list[list[str]]:
    # Gradio 6's Dataframe is an ARIA grid of virtual rows, not a plain <tbody>.
    rows = page.locator("#candidates [role=row].virtual-row")
    return [rows.nth(i).locator("[role=gridcell]").all_inner_texts() for i in range(rows.count())]


def choose_beam_search(page) -> None:
    beam_width = page.get_by_text("Beam width", exact=True)
    page.get_by_label("Greedy").check()  # the page starts with beam search: go there and back
    expect(beam_width).to_be_hidden()  # only shown for beam search
    page.get_by_label("Beam search").check()
    expect(beam_width).to_be_visible()


def test_upload_and_caption_with_beam_search(page, problems, example_images):
    page.locator("#photo input[type=file]").set_input_files(example_images[0])
    choose_beam_search(page)
    page.get_by_role("button", name="Caption this photo").click()

    expect(page.locator("#caption textarea")).not_to_have_value("", **WAIT)
    expect(page.locator("#facts")).to_contain_text("this caption took", **WAIT)
    rows = candidate_rows(page)
    assert 1 < len(rows) <= app.DEFAULT_BEAM_WIDTH
    assert rows[0][:2] == ["1", caption_text(page)]
    log_probs = [float(row[2]) for row in rows]
    assert log_probs == sorted(log_probs, reverse=True)

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert not problems


def test_example_click_captions_it_with_the_current_settings(page, problems, app_url):
    examples = app.example_images()
    choose_beam_search(page)
    page.locator("button.gallery-item").nth(1).click()

    shown = re.compile(re.escape(Path(examples[1]).name) + "$")
    expect(page.locator("#photo img").first).to_have_attribute("src", shown, **WAIT)
    expect(page.locator("#caption textarea")).not_to_have_value("", **WAIT)
    # The click ran the caption with the page's settings (beam search, width 5): same as the API gives.
    expected, _, _ = Client(app_url, verbose=False).predict(
        handle_file(examples[1]), "beam", app.DEFAULT_BEAM_WIDTH, api_name="/caption"
    )
    assert caption_text(page) == expected
    assert len(candidate_rows(page)) > 1
    assert not problems


def test_broken_file_shows_our_message_and_the_app_recovers(page, problems, tmp_path, example_images):
    def caption(path):
        page.locator("#photo input[type=file]").set_input_files(path)
        page.get_by_role("button", name="Caption this photo").click()

    caption(example_images[0])
    expect(page.locator("#facts")).to_contain_text("this caption took", **WAIT)

    broken = tmp_path / "holiday.jpg"
    broken.write_text("This is a text file with a .jpg name.")
    caption(broken)
    toast = page.locator("[data-testid=toast-body].error")
    expect(toast).to_be_visible(**WAIT)
    expect(toast.locator("[data-testid=toast-text]")).to_contain_text("This file is not an image in a format we can read")
    expect(page.locator("#facts")).not_to_contain_text("this caption took")  # the last timing is not this image's

    page.locator("[data-testid=toast-close]").click()
    caption(example_images[2])
    expect(page.locator("#facts")).to_contain_text("this caption took", **WAIT)
    expect(page.locator("#caption textarea")).not_to_have_value("", **WAIT)
    assert not problems
