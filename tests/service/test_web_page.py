"""The web page at ``/``, driven end to end in a real headless Chromium (Debian's, through Playwright) against a real
``reid serve``: identify -> matches -> enrol a new individual -> identify again ranks it first -> delete, plus the
API-key prompt, the similarity map and offline ``/docs``.

A screenshot of each step is kept in ``test-artifacts/web/<story>/`` (or ``$REID_TEST_ARTIFACTS/web``) for a person to look
at. Without a Chromium the test is skipped, unless ``REID_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs
one) makes that a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.service.conftest import API_KEY, Server, StartServer
from tests.service.helpers import enroll, photo, photos

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("REID_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")) / "web"
#: The flags a locked-down, offline headless Chromium needs (no sandbox: CI containers run as root).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
#: Only exact copies of an enrolled photo reach this with the tests' random-weight model: anything else is new.
THRESHOLD = "0.999"
#: An image the page has fetched (with the API key) and shown.
BLOB = re.compile(r"^blob:")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("REID_REQUIRE_BROWSER") == "1":
        pytest.fail("REID_REQUIRE_BROWSER=1 but no chromium is installed (apt-get install chromium)")
    pytest.skip("no chromium installed (apt-get install chromium); .ci/run installs it")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium with a fresh profile (Playwright gives every launch its own temporary ``--user-data-dir``)."""
    executable = _chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


class Steps:
    """Screenshots named by step, in order, in a folder per story, so each folder reads as the story of a test."""

    def __init__(self, page: Page, story: str) -> None:
        self.page = page
        self.count = 0
        self.folder = ARTIFACTS / story
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def shot(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=self.folder / f"{self.count:02d}_{name}.png", full_page=True)


@pytest.fixture
def page(browser: Browser, server_with_residents: Server) -> Iterator[Page]:
    """A fresh tab that records script errors and refuses every request leaving the service (the field has no
    internet: the page and /docs must not need it)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.errors = []  # type: ignore[attr-defined]
    opened.outside = []  # type: ignore[attr-defined]
    opened.on("pageerror", lambda error: opened.errors.append(str(error)))  # type: ignore[attr-defined]
    service = urlparse(server_with_residents.url).netloc

    def only_the_service(route, request) -> None:  # noqa: ANN001 (Playwright's Route and Request)
        if urlparse(request.url).scheme in ("http", "https") and urlparse(request.url).netloc != service:
            opened.outside.append(request.url)  # type: ignore[attr-defined]
            route.abort()
        else:
            route.continue_()

    opened.route("**/*", only_the_service)
    yield opened
    context.close()


@pytest.fixture
def server_with_residents(start_server: StartServer, tmp_path: Path, checkpoint_a: Path,
                          records: pd.DataFrame) -> Server:
    """A server with an API key and a threshold, with three individuals enrolled through the API."""
    server = start_server(checkpoint_a, tmp_path / "data", "--api-key", API_KEY,
                          environment={"REID_DEFAULT_THRESHOLD": THRESHOLD})
    with server.client() as client:
        for i in range(3):
            assert enroll(client, f"resident-{i}", photos(records, f"ind_00{i}")[:2]).status_code == 201
    return server


def _upload(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_identify_confirm_browse_and_delete_from_the_page(page: Page, server_with_residents: Server,
                                                          tmp_path: Path, records: pd.DataFrame) -> None:
    server = server_with_residents
    steps = Steps(page, "identify")
    with server.client() as client:
        known_bytes = client.get("/individuals/resident-1").json()["images"][0]["url"]
        known = _upload(tmp_path, "known.png", client.get(known_bytes).content)
    stranger = _upload(tmp_path, "stranger.png", photo(records, "ind_005"))

    page.goto(server.url + "/")
    expect(page.locator("#status")).to_contain_text("3 individuals, 6 photos")  # (and "1 individual" when one)
    expect(page.locator("#key-hint")).to_contain_text("asks for a key to add or delete")
    steps.shot("home")

    page.set_input_files("#identify-files", [str(known), str(stranger)])
    known_card = page.locator(".card.result[data-filename='known.png']")
    stranger_card = page.locator(".card.result[data-filename='stranger.png']")
    expect(known_card.locator(".verdict")).to_have_text("Best match: resident-1 (score 1.000)")
    expect(stranger_card.locator(".verdict")).to_contain_text("New turtle: no enrolled photo is similar enough")
    expect(known_card.locator("tbody tr").first).to_have_attribute("data-individual", "resident-1")
    expect(known_card.locator("figure img").nth(1)).to_have_attribute("src", BLOB)  # the matched photo shown
    steps.shot("identified")

    known_card.locator("tr[data-individual='resident-1'] button", has_text="Show matching points").click()
    expect(known_card.locator(".explain img")).to_have_attribute("src", BLOB)
    expect(known_card.locator(".explain")).to_contain_text("points of your photo match points of resident-1")
    steps.shot("matching_points")

    stranger_card.locator("input.new-id").fill("visitor 7")
    stranger_card.get_by_role("button", name="Enrol as a new individual").click()
    expect(page.locator("#message")).to_contain_text('"visitor 7" cannot be an id: use letters, digits and _ . - only')
    stranger_card.locator("input.new-id").fill("visitor-7 ")  # pasted with a space: trimmed
    stranger_card.locator("input.view").fill("Left")
    stranger_card.get_by_role("button", name="Enrol as a new individual").click()
    expect(page.locator("#message")).to_contain_text("asks for its API key: type it in the API key box")
    steps.shot("key_needed")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    page.locator("#api-key").blur()  # "change" fires on commit
    stranger_card.get_by_role("button", name="Enrol as a new individual").click()
    expect(page.locator("#message")).to_have_text("Enrolled visitor-7 with this photo.")
    expect(stranger_card).to_contain_text("Identified again after saving it to visitor-7")
    expect(stranger_card.locator(".verdict")).to_have_text("Best match: visitor-7 (score 1.000)")
    expect(page.locator("#status")).to_contain_text("4 individuals, 7 photos")
    # the card identified before visitor-7 existed would be identified again, but its matching points are open: it
    # keeps them, says the gallery changed, and is identified again when its user asks
    expect(known_card).to_contain_text("The enrolled photos changed while you were working on this photo")
    expect(known_card.locator(".explain img")).to_have_attribute("src", BLOB)
    steps.shot("kept_while_working")
    known_card.get_by_role("button", name="Identify it again").click()
    expect(known_card.locator("tr[data-individual='visitor-7']")).to_have_count(1)
    steps.shot("enrolled_and_identified_again")

    asked: list[str] = []  # an individual under the new-turtle line is added only once the user confirms
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    stranger_card.locator("tr[data-individual='resident-0'] button", has_text="add this photo").click()
    expect(stranger_card.locator(".verdict")).to_have_text("Best match: visitor-7 (score 1.000)")
    assert asked and "under the new-turtle line" in asked[0], asked
    with server.client() as client:
        assert client.get("/individuals/resident-0").json()["image_count"] == 2

    page.click("#tab-individuals")
    expect(page.locator("#individual-count")).to_have_text("4 individuals")
    page.fill("#search", "VISIT")
    expect(page.locator(".tile")).to_have_count(1)
    expect(page.locator(".tile")).to_contain_text("visitor-7")
    expect(page.locator(".tile img")).to_have_attribute("src", BLOB)
    steps.shot("search")
    page.locator(".tile[data-individual='visitor-7']").click()
    expect(page.locator("#individual-card")).to_contain_text("1 photo · enrolled")
    expect(page.locator("#individual-card figcaption")).to_contain_text("· left ·")  # the view typed on the card
    steps.shot("individual")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete visitor-7 and all its photos").click()
    expect(page.locator("#message")).to_have_text("Deleted visitor-7.")
    expect(page.locator("#individual-count")).to_have_text("No individual matches this search.")
    expect(known_card).to_contain_text("Identified again now that visitor-7 was deleted")  # no longer offered
    expect(known_card.locator("tr[data-individual='visitor-7']")).to_have_count(0)
    steps.shot("deleted")

    page.click("#tab-similarity")
    page.fill("#rsm-individuals", "resident-0, resident-2")
    page.click("#rsm-show")
    expect(page.locator("#rsm-image")).to_have_attribute("src", BLOB)
    steps.shot("similarity_map")

    page.goto(server.url + "/docs")
    expect(page.locator(".swagger-ui .opblock").first).to_be_visible(timeout=20_000)
    steps.shot("api_docs")

    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    assert page.outside == [], f"the page asked for files outside the service: {page.outside}"  # type: ignore
    with server.client() as client:
        assert client.get("/individuals/visitor-7").status_code == 404
        health = client.get("/health").json()
        assert (health["individuals"], health["photos"], health["gallery_size"]) == (3, 6, 6)


def test_delete_a_photo_with_confirmation_and_cancel(page: Page, server_with_residents: Server) -> None:
    """A cancelled confirmation deletes nothing; an accepted one deletes exactly that photo."""
    server = server_with_residents
    page.goto(server.url + "/")
    page.fill("#api-key", API_KEY)
    page.locator("#api-key").blur()
    page.click("#tab-individuals")
    page.locator(".tile[data-individual='resident-2']").click()
    photo_buttons = page.locator("#individual-card").get_by_role("button", name="Delete photo")
    expect(photo_buttons).to_have_count(2)
    page.once("dialog", lambda dialog: dialog.dismiss())
    photo_buttons.first.click()
    expect(photo_buttons).to_have_count(2)
    page.once("dialog", lambda dialog: dialog.accept())
    photo_buttons.first.click()
    expect(page.locator("#message")).to_contain_text("Deleted photo")
    expect(photo_buttons).to_have_count(1)
    expect(page.locator(".tile[data-individual='resident-2']")).to_contain_text("1 photo")  # the grid follows
    page.wait_for_timeout(300)
    expect(page.locator("#message")).to_be_visible()  # not wiped by the redrawn detail view
    page.locator("#message").click()  # it floats over the page as the user scrolls: a click puts it away
    expect(page.locator("#message")).to_be_hidden()
    with server.client() as client:
        assert client.get("/individuals/resident-2").json()["image_count"] == 1
        health = client.get("/health").json()
        assert health["photos"] == health["gallery_size"] == 5


def test_enrol_a_new_individual_with_several_photos_and_their_views(page: Page, server_with_residents: Server,
                                                                     tmp_path: Path, records: pd.DataFrame) -> None:
    """The Individuals tab enrols a new individual with all its photos at once, each with its own view (or none),
    and adds more to it the same way; an id the service refuses leaves nothing enrolled and says why."""
    server = server_with_residents
    pictures = [_upload(tmp_path, f"nesting-{i}.png", data) for i, data in enumerate(photos(records, "ind_007")[:3])]
    steps = Steps(page, "enrol_several")
    page.goto(server.url + "/")
    page.fill("#api-key", API_KEY)
    page.locator("#api-key").blur()
    page.click("#tab-individuals")
    page.locator("#new-individual-card summary").click()
    not_a_photo = _upload(tmp_path, "notes.txt", b"field notes, not a photo")
    page.set_input_files("#new-files", [str(path) for path in pictures[:2]] + [str(not_a_photo), str(pictures[0])])
    chosen = page.locator("#new-photos li")
    expect(chosen).to_have_count(3)
    expect(page.locator("#new-photos")).to_contain_text("1 photo chosen twice is listed once.")
    page.fill("#new-id", "nester-12")
    page.press("#new-id", "Enter")  # the service takes all or none: the text file stops the enrolment
    expect(page.locator("#message")).to_contain_text("Could not enrol nester-12: files[2] (notes.txt)")
    page.get_by_role("button", name="leave out notes.txt").click()  # the other photos and their views stay
    expect(chosen).to_have_count(2)
    chosen.nth(0).locator("input.view").fill("top")
    steps.shot("photos_chosen")
    page.fill("#new-id", "resident-0")  # taken
    page.get_by_role("button", name="Enrol the new individual").click()
    expect(page.locator("#message")).to_contain_text("Could not enrol resident-0")
    page.fill("#new-id", "nester-12")
    page.get_by_role("button", name="Enrol the new individual").click()
    expect(page.locator("#message")).to_have_text("Enrolled nester-12 with 2 photos.")
    card = page.locator("#individual-card")
    expect(card).to_contain_text("2 photos · enrolled")
    expect(card.locator("figcaption").nth(0)).to_contain_text("· top ·")
    expect(card.locator("figcaption").nth(1)).not_to_contain_text("· top ·")
    expect(page.locator(".tile[data-individual='nester-12']")).to_contain_text("2 photos")
    steps.shot("enrolled")

    card.locator("input[type=file]").set_input_files([str(pictures[2]), str(pictures[0])])
    card.locator("li input.view").nth(0).fill("right")
    card.get_by_role("button", name="Add these photos to nester-12").click()
    expect(page.locator("#message")).to_have_text("Added 1 photo to nester-12. 1 other photo was stored already (chosen "
                                                  "twice, or enrolled before) and keeps its first view.")
    expect(card).to_contain_text("3 photos · enrolled")
    expect(page.locator("#status")).to_contain_text("4 individuals, 9 photos")
    page.locator(".tile[data-individual='resident-0']").click()  # a slip: a photo of nester-12 filed under resident-0
    expect(page.locator("#individual-card h2")).to_have_text("resident-0")
    page.locator("#individual-card input[type=file]").set_input_files([str(pictures[1])])
    page.get_by_role("button", name="Add these photos to resident-0").click()
    expect(page.locator("#message")).to_have_class(re.compile(r"\bwarn\b"))
    expect(page.locator("#message")).to_contain_text("Added 1 photo to resident-0. Check it: photo ")
    expect(page.locator("#message")).to_contain_text("is also enrolled as nester-12. One photo under two individuals")
    steps.shot("filed_twice")
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    with server.client() as client:
        stored = client.get("/individuals/nester-12").json()["images"]
        assert [image["view"] for image in stored] == ["top", "", "right"]
        assert client.get("/individuals/resident-0").json()["image_count"] == 3  # 2, the refused id's, + the slip


def test_a_phone_reaches_every_button_of_an_answer(page: Page, server_with_residents: Server, tmp_path: Path) -> None:
    """At a phone's width each ranked individual is a block with its buttons on a line of their own: the table's
    last column had put "It is X: add this photo" off screen, in a table nobody knew scrolled."""
    server = server_with_residents
    with server.client() as client:
        known = _upload(tmp_path, "known.png", client.get(client.get("/individuals/resident-1").json()["images"][0]["url"]).content)
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(server.url + "/")
    page.set_input_files("#identify-files", [str(known)])
    card = page.locator(".card.result")
    expect(card.locator(".verdict")).to_have_text("Best match: resident-1 (score 1.000)")
    for button in card.locator("tbody button").all():
        box = button.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (button.inner_text(), box)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    Steps(page, "phone").shot("identified")


def test_the_individuals_list_shows_each_individual_once_whatever_the_clicks(page: Page,
                                                                            server_with_residents: Server) -> None:
    """A double click on the tab, or an answer to an older search arriving after a newer one, lists no individual
    twice and shows the newest search's individuals and count."""
    page.goto(server_with_residents.url + "/")
    page.dblclick("#tab-individuals")
    tiles = page.locator("#individual-grid .tile")
    expect(page.locator("#individual-count")).to_have_text("3 individuals")
    page.wait_for_load_state("networkidle")
    assert sorted(tiles.evaluate_all("nodes => nodes.map((node) => node.dataset.individual)")) == [
        "resident-0", "resident-1", "resident-2"]

    held = []
    page.route(lambda url: url.endswith("q=resident"), lambda route: held.append(route))  # a slow first answer
    page.fill("#search", "resident")
    for _ in range(200):  # the search's debounce (250 ms), then its request, held by the route above
        if held:
            break
        page.wait_for_timeout(25)
    assert len(held) == 1
    page.fill("#search", "resident-1")
    expect(tiles).to_have_count(1)
    held[0].continue_()  # the older search's three individuals arrive last
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(300)
    expect(tiles).to_have_count(1)
    expect(page.locator("#individual-count")).to_have_text("1 individual")
    assert page.errors == [], page.errors  # type: ignore[attr-defined]


def test_photos_over_the_upload_limit_are_sent_in_several_requests(browser: Browser, start_server: StartServer,
                                                                   tmp_path: Path, checkpoint_a: Path,
                                                                   records: pd.DataFrame) -> None:
    """Camera photos that together pass the service's body limit (/health's max_upload_bytes) enrol in several
    requests instead of a refusal; one refused in a later request leaves the individual enrolled with the others
    and says how to add the rest."""
    pictures = [_upload(tmp_path, f"camera-{i}.png", data) for i, data in enumerate(photos(records, "ind_006")[:3])]
    limit = 16384 + 1024 + max(path.stat().st_size for path in pictures) + 64  # one photo a request
    server = start_server(checkpoint_a, tmp_path / "small", "--max-upload-bytes", str(limit))
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    posts: list[str] = []
    page.on("request", lambda request: posts.append(urlparse(request.url).path) if request.method == "POST" else None)
    page.goto(server.url + "/")
    expect(page.locator("#status")).to_contain_text("0 individuals")
    page.click("#tab-individuals")
    page.locator("#new-individual-card summary").click()
    page.set_input_files("#new-files", [str(path) for path in pictures])
    page.locator("#new-photos li input.view").nth(2).fill("left")
    page.fill("#new-id", "camera-day")
    page.get_by_role("button", name="Enrol the new individual").click()
    expect(page.locator("#message")).to_have_text("Enrolled camera-day with 3 photos.")
    assert posts == ["/individuals", "/individuals/camera-day/images", "/individuals/camera-day/images"]
    with server.client() as client:
        assert [image["view"] for image in client.get("/individuals/camera-day").json()["images"]] == ["", "", "left"]

    notes = _upload(tmp_path, "notes.png", b"field notes, not a photo" + b" " * pictures[0].stat().st_size)
    expect(page.locator("#new-id")).to_be_visible()  # the form stays open for the next individual
    page.set_input_files("#new-files", [str(pictures[0]), str(notes)])
    page.fill("#new-id", "second-day")
    page.get_by_role("button", name="Enrol the new individual").click()
    expect(page.locator("#message")).to_contain_text("Enrolled second-day with 1 photo. 1 other photo could not be "
                                                     "added (notes.png): files[0] (notes.png)")
    expect(page.locator("#message")).to_contain_text("is also enrolled as camera-day")  # the usual check holds
    expect(page.locator("#individual-card h2")).to_have_text("second-day")
    pending = page.locator("#individual-card .photo-list li")  # the photo not stored waits, to be sent or left out
    expect(pending).to_have_count(1)
    expect(pending).to_contain_text("notes.png")
    Steps(page, "upload_limit").shot("partly_enrolled")
    big = _upload(tmp_path, "huge.png", pictures[0].read_bytes() + b"\0" * limit)
    page.locator("#individual-card input[type=file]").set_input_files([str(big)])
    page.get_by_role("button", name="Add these photos to second-day").click()
    expect(page.locator("#message")).to_contain_text(re.compile(
        r"huge\.png \([0-9.]+ MB\) does not fit in one request to this service \(at most [0-9.]+ MB, the form's own "
        r"bytes included\): send a smaller copy, or start the service with a higher --max-upload-bytes"))
    assert errors == [], errors
    context.close()


def test_a_verified_answer_says_which_matching_points_are_chance_level(
        browser: Browser, start_server: StartServer, tmp_path: Path, verified: tuple[Path, Path],
        verified_records: pd.DataFrame) -> None:
    """With verification on, the answer's table counts each individual's matching points; counts under the
    checkpoint's inlier floor, which photos of two different turtles reach by chance, are labelled so, and their
    drawing says the match rests on the photos' overall likeness."""
    server = start_server(verified[0], tmp_path / "verified")
    with server.client() as client:
        for i in range(3):
            assert enroll(client, f"turtle-{i}", photos(verified_records, f"ind_00{i}")[:3]).status_code == 201
    query = _upload(tmp_path, "another.png", photos(verified_records, "ind_000")[3])  # never enrolled
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    steps = Steps(page, "verified")
    page.goto(server.url + "/")
    page.set_input_files("#identify-files", [str(query)])
    card = page.locator(".card.result[data-filename='another.png']")
    expect(card.locator("tbody tr").first).to_have_attribute("data-individual", "turtle-0")
    expect(card.locator("thead")).to_contain_text("Matching points")
    own = card.locator("tr[data-individual='turtle-0'] td").nth(4)
    expect(own).to_have_text(re.compile(r"^\d+$"))  # its own turtle's photo: counted
    chance = card.locator("tr", has_text="(too few to count)")
    expect(chance.first).to_be_visible()
    steps.shot("chance_level")
    chance.first.get_by_role("button", name="Show matching points").click()
    expect(card.locator(".explain")).to_contain_text("no more than photos of two different turtles reach by chance, "
                                                     "so the score ignores these points")
    steps.shot("chance_level_drawn")
    assert errors == [], errors
    context.close()
