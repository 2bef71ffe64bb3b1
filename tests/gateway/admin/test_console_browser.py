"""The console in a real headless Chromium (Debian's chromium and chromium-driver, which `make test`
installs), driven by selenium: log in, see the requests the gateway served, open one's explanation.

With ICGATE_SCREENSHOTS set to a folder, each page is saved there as a PNG (docs/admin/ holds the ones
the docs show: `ICGATE_SCREENSHOTS=docs/admin .venv/bin/pytest tests/gateway/admin/test_console_browser.py`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.gateway.admin.conftest import ADMIN_KEY, StartGateway, ask, wait_logged
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


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
    WebDriverWait(browser, 15).until(expected_conditions.staleness_of(old))
    wait_for(browser, then)


def test_log_in_and_explain_a_request(browser: WebDriver, console: RunningGateway) -> None:
    request_id = ask(console)
    ask(console, "Summarise this: " + "the tide comes in and goes out " * 60)  # the rule router: large
    wait_logged(console, request_id)
    browser.delete_all_cookies()
    browser.get(console.url + "/admin")
    wait_for(browser, "input[type=password]")
    assert "/admin/login" in browser.current_url
    snap(browser, "login")
    browser.find_element(By.ID, "key").send_keys("not the key")
    click_to_new_page(browser, By.CSS_SELECTOR, "button[type=submit]", "#login-error")
    assert "not the admin key" in browser.find_element(By.ID, "login-error").text
    browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
    click_to_new_page(browser, By.CSS_SELECTOR, "button[type=submit]", "#route-split")
    split = browser.find_element(By.ID, "route-split").text
    assert "small" in split and "large" in split
    snap(browser, "overview")
    click_to_new_page(browser, By.LINK_TEXT, "Requests", "#requests")
    snap(browser, "requests")
    click_to_new_page(browser, By.LINK_TEXT, request_id, "[data-fact='route.tier']")
    fact = {
        key: browser.find_element(By.CSS_SELECTOR, f"[data-fact='{key}']").text
        for key in ("route.tier", "admit.decision", "admit.backend", "request.tenant", "outcome.status")
    }
    assert fact["route.tier"] == "small"
    assert fact["admit.decision"] == "admitted at once on small"
    assert fact["admit.backend"] == "small"
    assert fact["outcome.status"] == "200"
    snap(browser, "request")
    # the session is an HttpOnly cookie: the page's scripts cannot read it
    assert "icgate_admin" not in str(browser.execute_script("return document.cookie"))
    click_to_new_page(
        browser, By.CSS_SELECTOR, "header button[type=submit]", "input[type=password]"
    )  # log out
    browser.get(console.url + "/admin/requests")
    wait_for(browser, "input[type=password]")  # logged out: back to the login page
    assert httpx.get(console.url + "/admin/requests", follow_redirects=False).status_code == 303


def test_create_and_revoke_a_key_in_the_browser(
    browser: WebDriver, standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(standin_policy(standins, "http", auth={"required": True}))
    browser.delete_all_cookies()
    browser.get(gw.url + "/admin/keys")
    wait_for(browser, "input[type=password]")
    browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
    click_to_new_page(browser, By.CSS_SELECTOR, "button[type=submit]", "#tenant")
    browser.find_element(By.ID, "tenant").send_keys("acme")
    click_to_new_page(browser, By.ID, "create-key", "#new-key-value")
    key = browser.find_element(By.ID, "new-key-value").text
    snap(browser, "keys")
    models = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert models.status_code == 200
    click_to_new_page(browser, By.CSS_SELECTOR, "#keys button.revoke", "#keys")
    assert browser.find_element(By.CSS_SELECTOR, "#keys td.state").text == "revoked"
    assert key not in browser.page_source  # shown once, never again
    refused = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert refused.status_code == 401


def test_delete_a_cache_entry_in_the_browser_and_see_it_gone_from_the_answers(
    browser: WebDriver, standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.gateway.admin.test_admin_api import route_of
    from tests.gateway.conftest import settle_cache

    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(standin_policy(standins, "http", cache={"enabled": True, "sync_interval_s": 0.2}))
    question = "How many legs does a spider have?"
    ask(gw, question)
    settle_cache(gw.gateway)
    assert route_of(gw, question) == "cache"
    browser.delete_all_cookies()
    browser.get(gw.url + "/admin/cache?q=spider")
    wait_for(browser, "input[type=password]")
    browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
    click_to_new_page(browser, By.CSS_SELECTOR, "button[type=submit]", "#entries")
    assert browser.find_element(By.CSS_SELECTOR, "#entries td.question").text == question
    snap(browser, "cache")
    browser.find_element(By.CSS_SELECTOR, "#entries input[type=checkbox]").click()
    click_to_new_page(browser, By.ID, "delete-selected", "#entries")
    assert "No entries match." in browser.find_element(By.ID, "entries").text
    assert route_of(gw, question) == "small"


def test_the_request_log_follows_new_requests_while_open(browser: WebDriver, console: RunningGateway) -> None:
    first = ask(console, "What colour is the sky?")
    wait_logged(console, first)
    browser.delete_all_cookies()
    browser.get(console.url + "/admin/requests")
    wait_for(browser, "input[type=password]")
    browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
    click_to_new_page(browser, By.CSS_SELECTOR, "button[type=submit]", "#requests")
    browser.execute_script("window.icgateMarker = 'same page'")
    later = ask(console, "What colour is grass?")
    WebDriverWait(browser, 30).until(
        expected_conditions.presence_of_element_located((By.LINK_TEXT, later))
    )  # it appears without a reload ...
    assert browser.execute_script("return window.icgateMarker") == "same page"  # ... of the page itself
    assert browser.find_element(By.LINK_TEXT, first)  # older rows stay listed
