"""The live endpoints page in headless Chromium (Debian's chromium and chromium-driver, through selenium).

scripts/setup-system installs the browser; when it is missing the test fails saying so, it never skips.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import ROOT, RawMqtt, ServiceProcess, service_token, token

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = ROOT / "docs" / "dashboard.png"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), f"{path} is missing: run scripts/setup test (Debian chromium, chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,720"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def rows(driver: WebDriver) -> dict[str, list[str]]:
    """Each row's cells, read in one go in the page (it redraws the table every second)."""
    found: dict[str, list[str]] = driver.execute_script(
        "const rows = {};"
        "for (const tr of document.querySelectorAll('#rows tr'))"
        "  rows[tr.dataset.id] = [...tr.children].map((td) => td.textContent);"
        "return rows;")
    return found


def row_states(driver: WebDriver) -> dict[str, str]:
    return {endpoint_id: cells[3] for endpoint_id, cells in rows(driver).items()}


def test_the_page_shows_endpoints_live_and_follows_one_to_sick_and_gone(
    browser: WebDriver, make_service: Callable[..., ServiceProcess], unique: str, tmp_path: Path
) -> None:
    # SICK after keepAliveSeconds, removed 5 s later: a window the page is sure to show.
    process = make_service(env={"ENDPOINT_BROKER_MIN_EXPIRY_GRACE_SECONDS": "5"})
    org = f"o-{unique}"
    # The page redraws its table every second: an element found just before a redraw goes stale.
    wait = WebDriverWait(browser, 20, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException])

    browser.get(process.base_url + "/dashboard")
    browser.find_element(By.ID, "token").send_keys(service_token("backend", org))
    browser.find_element(By.ID, "connect").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "live")

    alice = token("alice", org)
    rest_id = process.register(alice, keep_alive=600, endpoint_id=f"tab-{unique}")
    process.register(token("bob", f"other-{unique}"), endpoint_id=f"elsewhere-{unique}")  # not for this token
    with RawMqtt(process.mqtt_port) as phone:
        assert phone.connect(f"phone-{unique}", "alice", alice, keep_alive=60) == (0, False)
        wait.until(lambda d: row_states(d).keys() == {rest_id, f"phone-{unique}"})
        cells = rows(browser)[f"phone-{unique}"]
        # id, user, organisation, state, connected, transport, version, last keepalive
        assert cells[:6] == [f"phone-{unique}", "alice", org, "HEALTHY", "yes", "tcp"]
        assert cells[7].endswith(" s ago")

        # The filter box and the counts by state.
        browser.find_element(By.ID, "filter").send_keys("phone")
        wait.until(lambda d: list(row_states(d)) == [f"phone-{unique}"])
        browser.find_element(By.ID, "filter").clear()
        browser.find_element(By.ID, "filter").send_keys(" ")  # an input event, back to every row
        wait.until(lambda d: len(row_states(d)) == 2)

        # Registered again with a short keepAliveSeconds, counted from now: it turns SICK, then expires.
        process.register(alice, keep_alive=2, endpoint_id=rest_id)
        wait.until(lambda d: row_states(d).get(rest_id) == "SICK")
        wait.until(lambda d: d.find_element(By.ID, "count-SICK").text == "SICK: 1")
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        if os.environ.get("UPDATE_SCREENSHOTS"):
            browser.save_screenshot(str(SCREENSHOT))  # the README's picture: UPDATE_SCREENSHOTS=1, then commit
        wait.until(lambda d: rest_id not in row_states(d))
        assert row_states(browser) == {f"phone-{unique}": "HEALTHY"}
    assert (tmp_path / "dashboard.png").stat().st_size > 0

    # The token lives in sessionStorage only; forgetting it, or a refused one, brings the form back.
    assert browser.execute_script("return sessionStorage.length") == 1
    assert browser.execute_script("return localStorage.length") == 0
    browser.find_element(By.ID, "logout").click()
    wait.until(lambda d: d.find_element(By.ID, "token").is_displayed())
    assert browser.execute_script("return sessionStorage.length") == 0
    browser.find_element(By.ID, "token").send_keys(alice)  # a user token, not a SERVICE one
    browser.find_element(By.ID, "connect").click()
    # The form comes back, saying why (the 401's problem detail).
    wait.until(lambda d: d.find_element(By.ID, "token").get_attribute("placeholder")
               == "the dashboard needs a SERVICE token" and d.find_element(By.ID, "token").is_displayed())
    assert browser.execute_script("return sessionStorage.length") == 0
