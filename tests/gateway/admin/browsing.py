"""Driving the console in a real headless Chromium (Debian's chromium and chromium-driver, which `make test`
installs) with selenium: the few moves every browser test makes.

With ICGATE_SCREENSHOTS set to a folder, `snap` saves each page there as a PNG (docs/admin/ holds the
ones the docs show: `ICGATE_SCREENSHOTS=docs/admin .venv/bin/pytest tests/gateway/admin -k browser`).
"""

from __future__ import annotations

import os
from pathlib import Path

from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.gateway.admin.conftest import ADMIN_KEY
from tests.gateway.conftest import RunningGateway


def snap(browser: WebDriver, name: str) -> None:
    folder = os.environ.get("ICGATE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


def wait_for(browser: WebDriver, css: str) -> None:
    WebDriverWait(browser, 15).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def click_to_new_page(browser: WebDriver, by: str, what: str, then: str) -> None:
    """Click something that loads a page, and wait for the new page (not the old one, still on screen
    for a moment, which has the same ids) to hold `then`."""
    old = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(by, what).click()
    WebDriverWait(browser, 15).until(lambda _: detached(old))
    wait_for(browser, then)


def detached(element: WebElement) -> bool:
    """Whether `element` has left the page. Selenium's `staleness_of` expects a stale-element error, but
    ChromeDriver, asked in the middle of a navigation, may answer "Node with given id does not belong to
    the document" instead (seen once in CI): that too means the old page is gone."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


def log_in(browser: WebDriver, gw: RunningGateway, path: str = "/admin") -> None:
    """Open `path`, land on the login page, submit the admin key, and be on `path`."""
    browser.get(gw.url + path)
    wait_for(browser, "input[type=password]")
    browser.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(ADMIN_KEY)
    click_to_new_page(browser, By.CSS_SELECTOR, "button[type=submit]", "header")
