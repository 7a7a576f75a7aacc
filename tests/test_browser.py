"""The app in a real browser: Playwright driving Debian's Chromium against `python app.py` (tiny weights).

Every test also checks that the page logged no console errors and fetched nothing from outside the app.
None needs excusing: the theme uses system fonts (Gradio's default themes fetch Google Fonts, which fail
offline) and nothing else is loaded from elsewhere. Gradio does log a "Method not implemented." warning
from its own bundle; that is a warning, not an error, and is left alone.

Screenshots of each view go to tests/artifacts/ (browser_*.png): look at them after a change to the page.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

import app
from benchmarks.app_process import running_app

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
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

    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("request", on_request)
    page.set_default_timeout(WAIT["timeout"])
    page.goto(app_url)
    expect(page.get_by_role("heading", name="Image captioner")).to_be_visible(**WAIT)
    yield page
    context.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"browser_{name}.png", full_page=True)


# ---- the "One photo" tab ------------------------------------------------------------------------------


def one_photo(page):
    return page.locator("#one-photo")


def caption_text(page) -> str:
    return page.locator("#caption textarea").input_value()


def words(page) -> list[str]:
    return page.locator("#words .token.highlighted").all_inner_texts()


def candidate_rows(page) -> list[list[str]]:
    # Gradio 6's Dataframe is an ARIA grid of virtual rows, not a plain <tbody>.
    rows = page.locator("#candidates [role=row].virtual-row")
    return [rows.nth(i).locator("[role=gridcell]").all_inner_texts() for i in range(rows.count())]


def choose_beam_search(page) -> None:
    tab = one_photo(page)
    beam_width = tab.get_by_text("Beam width", exact=True)
    tab.get_by_label("Greedy", exact=True).check()  # the page starts with beam search: go there and back
    expect(beam_width).to_be_hidden()  # only shown for beam search
    tab.get_by_label("Beam search", exact=True).check()
    expect(beam_width).to_be_visible()


def caption_upload(page, path) -> None:
    one_photo(page).locator("#photo input[type=file]").set_input_files(path)
    one_photo(page).get_by_role("button", name="Caption this photo").click()


def test_the_caption_word_by_word_and_where_each_word_came_from(page, problems, example_images):
    choose_beam_search(page)
    caption_upload(page, example_images[0])
    expect(page.locator("#facts")).to_contain_text("this caption took", **WAIT)
    text = caption_text(page)
    assert text and words(page) == text.split()  # each word of the caption, shaded by its probability
    shades = page.locator("#words .token.highlighted").evaluate_all("spans => spans.map(s => s.style.backgroundColor)")
    assert all(re.fullmatch(r"rgba\(239, 68, 60, 0?\.\d+\)|rgb\(239, 68, 60\)", shade) for shade in shades), shades

    # The heatmap of the first word that names something is shown; a click on another word shows that one's.
    heatmap = page.locator("#heatmap img")
    expect(heatmap).to_be_visible(**WAIT)
    first_src = heatmap.get_attribute("src")
    note = page.locator("#heat-note")
    expect(note).to_contain_text("Where the model looked for")
    last = len(words(page)) - 1
    page.locator("#words .token.highlighted").nth(last).click()
    expect(note).to_contain_text(f"\u201c{words(page)[last]}\u201d (word {last + 1},", **WAIT)
    expect(heatmap).not_to_have_attribute("src", first_src, **WAIT)

    rows = candidate_rows(page)
    assert 1 < len(rows) <= app.DEFAULTS.beam_width
    assert rows[0][:2] == ["1", text]
    scores = [float(row[2]) for row in rows]
    assert scores == sorted(scores, reverse=True)  # ranked by the score shown
    assert all(re.fullmatch(r"\d+(\.\d)?%|1 in .+|under 1 in a quadrillion", row[4]) for row in rows)
    screenshot(page, "explain")
    assert not problems


def test_the_model_menu(page, problems, example_images):
    """The menu above the tabs: the default first and chosen; the others load when first chosen: the Lite0 + Lite1
    ensemble anywhere (no TensorFlow needed), ResNet50 and its ensemble where this machine can (else, without
    TensorFlow or ResNet50's weights, the page says what to install)."""
    menu, status = page.locator("#model input"), page.locator("#model-status")
    expect(menu).to_have_value(re.compile(r"^MobileNetV2 \(default\)"))
    expect(status).to_contain_text("MobileNetV2 (default)")
    menu.click()
    expect(page.get_by_role("option")).to_have_count(4)
    page.get_by_role("option", name=re.compile(r"^Lite0 \+ Lite1 ensemble")).click()
    expect(status).to_contain_text("without TensorFlow")
    caption_upload(page, example_images[1])
    facts, toast = page.locator("#facts"), page.locator("[data-testid=toast-body].error")
    expect(facts).to_contain_text("Lite0 + Lite1 ensemble \u00b7 Encoders", **WAIT)
    expect(page.locator("#seen")).to_contain_text("The image classifier sees:")  # Lite0's classifier

    menu.click()
    page.get_by_role("option", name=re.compile(r"^ResNet50")).click()
    expect(status).to_contain_text("The reference recipe")
    one_photo(page).get_by_role("button", name="Caption this photo").click()
    # The facts name ResNet50 once it answered, with its encoder or with "can't be loaded here" (and a toast says why).
    expect(facts).to_contain_text("ResNet50 \u00b7", **WAIT)
    if "can't be loaded here" in facts.inner_text():
        expect(toast).to_contain_text("ResNet50 can't be loaded on this server")
        expect(toast).to_contain_text("pip install -r training/requirements.txt")
        expect(menu).to_have_value(re.compile(r"can't be loaded here"), **WAIT)
        screenshot(page, "model_unavailable")
        assert not problems
        return
    expect(facts).to_contain_text("ResNet50 \u00b7 Encoder resnet50")  # the facts name the model that captioned
    assert caption_text(page) and words(page) == caption_text(page).split()
    expect(page.locator("#heat-note")).to_contain_text("Where the model looked for")

    menu.click()
    page.get_by_role("option", name=re.compile(r"^Lite0 \+ ResNet50 ensemble")).click()
    expect(status).to_contain_text("choosing each word together")
    one_photo(page).get_by_role("button", name="Caption this photo").click()
    expect(facts).to_contain_text("Lite0 + ResNet50 ensemble \u00b7 Encoders", **WAIT)
    expect(page.locator("#heat-note")).to_contain_text("Where the ensemble's EfficientNet-Lite0 member looked for")
    expect(page.locator("#seen")).to_contain_text("The image classifier sees:")  # Lite0's classifier
    screenshot(page, "model_choice")
    assert not problems


def test_a_prompt_starts_the_caption(page, problems, example_images):
    one_photo(page).get_by_label("Start the caption with").fill("A dog")
    caption_upload(page, example_images[3])
    expect(page.locator("#caption textarea")).to_have_value(re.compile(r"^a dog "), **WAIT)
    assert words(page)[:2] == ["a", "dog"]

    one_photo(page).get_by_label("Start the caption with").fill("a zebra")
    one_photo(page).get_by_role("button", name="Caption this photo").click()
    toast = page.locator("[data-testid=toast-body].error")
    expect(toast.locator("[data-testid=toast-text]")).to_contain_text("doesn't know the word 'zebra'", **WAIT)
    expect(page.locator("#caption textarea")).to_have_value("")  # the view doesn't keep another request's caption
    assert not problems


def test_example_click_explains_it_with_the_current_settings(page, problems, app_url):
    examples = app.example_images()
    choose_beam_search(page)
    one_photo(page).locator("button.gallery-item").nth(1).click()

    shown = re.compile(re.escape(Path(examples[1]).name) + "$")
    expect(page.locator("#photo img").first).to_have_attribute("src", shown, **WAIT)
    expect(page.locator("#caption textarea")).not_to_have_value("", **WAIT)
    # The click ran with the page's settings (beam search, width 5): the caption the API gives.
    expected, *_ = Client(app_url, verbose=False).predict(
        handle_file(examples[1]), "beam", app.DEFAULTS.beam_width, api_name="/caption"
    )
    assert caption_text(page) == expected and words(page) == expected.split()
    expect(page.locator("#heatmap img")).to_be_visible()
    assert len(candidate_rows(page)) > 1
    assert not problems


def test_sampling_shows_its_own_settings_and_a_seed_repeats_its_caption(page, problems, app_url, example_images):
    tab = one_photo(page)
    tab.get_by_label("Sampling", exact=True).check()
    expect(tab.get_by_text("Temperature", exact=True)).to_be_visible()
    expect(tab.get_by_text("Beam width", exact=True)).to_be_hidden()  # beam search's own settings go
    seed = tab.get_by_label("Seed (optional)")
    expect(seed).to_have_value("")  # empty: a new caption each time (not a seed of 0)
    seed.fill("7")
    caption_upload(page, example_images[1])
    expect(page.locator("#facts")).to_contain_text("this caption took", **WAIT)
    # The page's temperature and top-p start at the API's defaults: the same seed gives the API's caption.
    expected, *_ = Client(app_url, verbose=False).predict(handle_file(example_images[1]), "sample", seed=7, api_name="/caption")
    assert caption_text(page) == expected
    screenshot(page, "sampling")
    assert not problems


def test_broken_file_shows_our_message_and_the_app_recovers(page, problems, tmp_path, example_images):
    caption_upload(page, example_images[0])
    expect(page.locator("#facts")).to_contain_text("this caption took", **WAIT)

    broken = tmp_path / "holiday.jpg"
    broken.write_text("This is a text file with a .jpg name.")
    caption_upload(page, broken)
    toast = page.locator("[data-testid=toast-body].error")
    expect(toast).to_be_visible(**WAIT)
    expect(toast.locator("[data-testid=toast-text]")).to_contain_text("This file is not an image in a format we can read")
    expect(page.locator("#facts")).not_to_contain_text("this caption took")  # the last timing is not this image's
    assert words(page) == []  # nor are the last photo's words and heatmap
    expect(page.locator("#heatmap img")).to_have_count(0)

    page.locator("[data-testid=toast-close]").click()
    caption_upload(page, example_images[2])
    expect(page.locator("#facts")).to_contain_text("this caption took", **WAIT)
    expect(page.locator("#caption textarea")).not_to_have_value("", **WAIT)
    assert not problems


# ---- the "Many photos" tab ------------------------------------------------------------------------------


def test_many_photos_with_a_download(page, problems, example_images, tmp_path, app_url):
    page.get_by_role("tab", name="Many photos").click()
    tab = page.locator("#many-photos")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    files = [*example_images[:4], bad]
    tab.locator("#batch-files input[type=file]").set_input_files(files)
    expect(tab.get_by_role("button", name="Remove this file")).to_have_count(len(files), **WAIT)  # uploaded
    tab.get_by_label("Greedy", exact=True).check()
    tab.get_by_role("button", name="Caption all photos").click()

    expect(page.locator("#batch-summary")).to_contain_text("Captioned 4 of 5 photos", **WAIT)
    expect(page.locator("#batch-gallery img")).to_have_count(4)
    rows = page.locator("#batch-table [role=row].virtual-row")
    expect(rows).to_have_count(5)
    table = [rows.nth(i).locator("[role=gridcell]").all_inner_texts() for i in range(5)]
    assert [row[0] for row in table] == [f.name for f in files]
    assert "not an image" in table[4][2] and not table[4][1].strip()
    client = Client(app_url, verbose=False)
    assert table[0][1] == client.predict(handle_file(files[0]), "greedy", 5, api_name="/caption")[0]
    screenshot(page, "many_photos")

    with page.expect_download() as download:
        page.locator("#batch-downloads").get_by_role("row", name=re.compile(r"captions\s*\.csv")).get_by_role("link").click()
    saved = tmp_path / "downloaded.csv"
    download.value.save_as(saved)
    lines = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert [line["image"] for line in lines] == [f.name for f in files]
    assert [line["caption"] for line in lines] == [row[1] for row in table]
    assert not problems
