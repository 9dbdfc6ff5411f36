"""End to end in a real browser: ``streamlit run`` on a free port, Debian's headless Chromium driven by Selenium.

An operator enters their name, confirms a false alarm on the first queue item with a click, answers the next item
with the keyboard shortcut (after typing in the description, which must not fire shortcuts), draws a defect region
on the third and confirms the defect, and the verdicts are read back from the knowledge base file. Screenshots of the queue, the item with its heat map and the dashboard go to
``docs/images/review_app/`` for docs/review_app.md.

Needs ``chromium`` and ``chromium-driver`` (``.ci/browser.sh`` installs them); marked slow (about half a minute).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from app_support import CATEGORY, MAIN, ReviewData, build_review_data

pytestmark = pytest.mark.slow

try:
    from selenium import webdriver
except ImportError:  # a dev dependency; CI must have it, so only a local run may skip
    if os.environ.get("CI"):
        raise
    pytest.skip("selenium is needed for the browser test (pip install selenium)", allow_module_level=True)
from selenium.common.exceptions import (  # noqa: E402
    ElementClickInterceptedException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = os.environ.get("MADFH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MADFH_CHROMEDRIVER", "/usr/bin/chromedriver")
#: docs/images/review_app when MADFH_UPDATE_SCREENSHOTS=1 (to refresh the docs), else a temp folder: a test run must not
#: change tracked files.
SCREENSHOTS = (
    Path(__file__).resolve().parents[2] / "docs" / "images" / "review_app"
    if os.environ.get("MADFH_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "madfh_review_app_screenshots"
)
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,1000",
)
WAIT_S = 30


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ReviewData, str]]:
    """The app served by a real ``streamlit run`` on a tiny knowledge base; yields the data and the base URL."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message = f"{CHROMIUM} / {CHROMEDRIVER} missing: run .ci/browser.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    data = build_review_data(tmp_path)
    port = _free_port()
    streamlit = Path(sys.executable).with_name("streamlit")
    command = [
        str(streamlit) if streamlit.exists() else shutil.which("streamlit") or "streamlit",
        "run", str(MAIN),
        "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
        "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
        "--", "--kb-url", data.kb_url, "--data-root", str(data.data_root), "--no-text-search",
    ]  # fmt: skip
    log = (tmp_path / "streamlit.log").open("w")
    server = subprocess.Popen(command, cwd=data.root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not come up:\n{(tmp_path / 'streamlit.log').read_text()}")
            time.sleep(0.3)
        yield data, url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_text(driver: WebDriver, text: str) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text, text)


def _find(driver: WebDriver, css: str) -> WebElement:
    """The element, once Streamlit has drawn it: on a loaded machine a rerun can still be replacing the widget."""
    return WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.CSS_SELECTOR, css), css)


def _idle(driver: WebDriver) -> None:
    """Wait until Streamlit finished the current run (its status widget says 'Running...' meanwhile)."""
    time.sleep(0.3)
    WebDriverWait(driver, WAIT_S).until(
        lambda d: (
            not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"] [data-testid*="Running"]')
            and "Running..." not in d.find_element(By.TAG_NAME, "body").text
        )
    )


def _click(driver: WebDriver, key: str) -> None:
    """Click the button with Streamlit key ``key`` once it is enabled; Streamlit re-renders the page on each run,
    so an element found a moment ago may be replaced before the click lands (stale): find it again then."""

    def click(d: WebDriver) -> bool:
        try:
            button = d.find_element(By.CSS_SELECTOR, f".st-key-{key} button")
            if not button.is_enabled():
                return False
            button.click()
            return True
        except (StaleElementReferenceException, NoSuchElementException, ElementClickInterceptedException):
            return False

    WebDriverWait(driver, WAIT_S).until(click, f"button {key}")


def _shot(driver: WebDriver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)  # let images and charts finish drawing
    assert driver.save_screenshot(str(SCREENSHOTS / name)), name


def test_operator_confirms_a_false_alarm_in_real_chromium(
    served: tuple[ReviewData, str], browser: WebDriver, tmp_path: Path
) -> None:
    try:
        _review_in_the_browser(*served, browser)
    except Exception as exc:
        browser.save_screenshot(str(tmp_path / "failure.png"))
        body = browser.find_element(By.TAG_NAME, "body").text
        server_log = (tmp_path / "streamlit.log").read_text()
        raise AssertionError(
            f"browser test failed (screenshot {tmp_path / 'failure.png'}); page:\n{body}\n\nserver log:\n{server_log}"
        ) from exc


def _review_in_the_browser(data: ReviewData, url: str, browser: WebDriver) -> None:
    first, second = data.ids["001_regular"], data.ids["003_regular"]
    browser.get(f"{url}/")  # the review queue is the default page
    _wait_text(browser, f"Item #{first}")
    _idle(browser)
    _shot(browser, "queue.png")

    operator = _find(browser, '[data-testid="stSidebar"] input[aria-label="Operator"]')
    operator.send_keys("anna", Keys.ENTER)
    _idle(browser)
    _click(browser, "action-false_alarm")
    _wait_text(browser, f"Saved: false alarm on #{first} by anna.")
    _wait_text(browser, f"Item #{second}")
    _idle(browser)
    _shot(browser, "item.png")

    with data.kb() as kb:
        (row,) = kb.feedback_for(first)
    assert (row.operator, row.verdict, row.outcome) == ("anna", "OK", "false_alarm")

    # The next item by keyboard: typing in the description (it contains "d" and "f") must not fire a verdict,
    # pressing F with the focus outside the text field must.
    description = _find(browser, f".st-key-description-{second} textarea")
    description.send_keys("faded reflection")
    time.sleep(1.0)
    with data.kb() as kb:
        assert kb.feedback_for(second) == [], "a shortcut fired while typing"
    browser.execute_script("document.activeElement.blur()")  # focus out of the text field
    ActionChains(browser).send_keys("f").perform()
    _wait_text(browser, f"Saved: false alarm on #{second} by anna.")
    with data.kb() as kb:
        (row,) = kb.feedback_for(second)
    assert (row.operator, row.outcome, row.description) == ("anna", "false_alarm", "faded reflection")

    # A third item with a region drawn on the image (streamlit-drawable-canvas) and a confirmed defect.
    third = data.ids["007_regular"]
    _wait_text(browser, f"Item #{third}")
    _idle(browser)
    toggle = _find(browser, f".st-key-draw-{third} label")
    toggle.click()
    # The canvas component lives in a shadow root; Fabric.js listens on its upper canvas (the last one).
    canvas = WebDriverWait(browser, WAIT_S).until(
        lambda d: d.execute_script(
            "const host = [...document.querySelectorAll(arguments[0])].find(e => e.shadowRoot);"
            "const found = host ? host.shadowRoot.querySelectorAll('canvas') : [];"
            "return found.length ? found[found.length - 1] : null;",
            f".st-key-canvas-{third}, .st-key-canvas-{third} *",
        )
    )
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    ActionChains(browser).move_to_element_with_offset(canvas, -200, -100).click_and_hold().move_by_offset(
        120, 60
    ).release().perform()
    _wait_text(browser, "1 region(s) will be stored")
    _idle(browser)
    _click(browser, "action-confirm_defect")
    _wait_text(browser, f"Saved: confirmed defect on #{third} by anna.")
    with data.kb() as kb:
        (row,) = kb.feedback_for(third)
    # Dragged 120 x 60 canvas pixels from 200 left and 100 above the centre of a 640 x 480 canvas showing a
    # 160 x 120 image: a quarter of that in image pixels.
    assert row.outcome == "confirmed_defect"
    (polygon,) = row.region_polygon
    expected = [[30, 35], [60, 35], [60, 50], [30, 50]]
    assert np.allclose(polygon, expected, atol=1.0), polygon

    # In-app navigation keeps the session: the operator name is still there on the dashboard.
    _find(browser, '[data-testid="stSidebarNav"] a[href$="/dashboard"]').click()
    _wait_text(browser, "Scores per decision")
    _idle(browser)
    WebDriverWait(browser, WAIT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]')) >= 2
    )
    _shot(browser, "dashboard.png")
    assert CATEGORY in browser.find_element(By.TAG_NAME, "body").text
    operator = _find(browser, '[data-testid="stSidebar"] input[aria-label="Operator"]')
    assert operator.get_attribute("value") == "anna"
