"""GET /rtc-api/docs in a real browser: Swagger UI renders the OpenAPI 3.1 document, every route listed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from http_bridge.openapi import DOCS_PATH, openapi_document
from tests.support import ServiceProcess

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(binary):
            pytest.fail(f"{binary} is missing: run scripts/setup test (as root it installs Debian's chromium and "
                        "chromium-driver)")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                     "--window-size=1280,2400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_docs_page_lists_every_route_from_our_own_assets(service: ServiceProcess, browser: webdriver.Chrome,
                                                             tmp_path: Path) -> None:
    browser.get(service.base_url + DOCS_PATH)
    expected = {(method.upper(), path) for path, item in openapi_document()["paths"].items() for method in item}

    def listed(driver: webdriver.Chrome) -> set[tuple[str, str]] | None:
        found = {(block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
                  block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"))
                 for block in driver.find_elements(By.CSS_SELECTOR, ".opblock")}
        return found if found >= expected else None

    try:
        assert WebDriverWait(browser, 30).until(listed) == expected
        # Swagger UI 5 renders OpenAPI 3.1: no "unsupported version" error box.
        assert not browser.find_elements(By.CSS_SELECTOR, ".errors-wrapper .error-wrapper")
    finally:
        browser.save_screenshot(str(tmp_path / "docs-page.png"))
    assert (tmp_path / "docs-page.png").stat().st_size > 0
    # Every script and style sheet came from the service itself: nothing from a CDN.
    sources = [element.get_attribute("src") or element.get_attribute("href")
               for element in browser.find_elements(By.CSS_SELECTOR, "script[src], link[rel=stylesheet]")]
    assert sources and all(source.startswith(service.base_url + DOCS_PATH + "/") for source in sources)


def test_only_the_pages_assets_are_served(service: ServiceProcess) -> None:
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js"):
        assert httpx.get(f"{service.base_url}{DOCS_PATH}/{asset}", timeout=10).status_code == 200
    missing = httpx.get(f"{service.base_url}{DOCS_PATH}/index.html", timeout=10)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
