"""The console in a real headless Chromium (Debian's chromium and chromium-driver, which `make test`
installs), driven by selenium: log in, see the requests the gateway served, open one's explanation.

With ICGATE_SCREENSHOTS set to a folder, each page is saved there as a PNG (docs/admin/ holds the ones
the docs show: `ICGATE_SCREENSHOTS=docs/admin .venv/bin/pytest tests/gateway/admin/test_console_browser.py`).
"""

from __future__ import annotations

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from icgate.gateway.store import keys
from tests.gateway.admin.browsing import click_to_new_page, snap, wait_for
from tests.gateway.admin.conftest import ADMIN_KEY, StartGateway, ask, wait_logged
from tests.gateway.conftest import RunningGateway, Standins, standin_policy


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
    attempt = browser.find_element(By.CSS_SELECTOR, "[data-fact='attempts'] li").text
    assert attempt.startswith("1. small (first): answered in ")
    assert "slots in use" in browser.find_element(By.CSS_SELECTOR, "[data-fact='admission.state']").text
    snap(browser, "request")
    # the session is an HttpOnly cookie: the page's scripts cannot read it
    assert "icgate_admin" not in str(browser.execute_script("return document.cookie"))
    click_to_new_page(
        browser, By.CSS_SELECTOR, "header button[type=submit]", "input[type=password]"
    )  # log out
    browser.get(console.url + "/admin/requests")
    wait_for(browser, "input[type=password]")  # logged out: back to the login page
    assert httpx.get(console.url + "/admin/requests", follow_redirects=False).status_code == 303


def ask_as_status(gw: RunningGateway, key: str) -> int:
    body = {"model": "auto", "messages": [{"role": "user", "content": "Hello again?"}]}
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30).status_code


def test_create_and_revoke_a_key_and_change_a_tenants_limits_in_the_browser(
    browser: WebDriver, standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.gateway.admin.test_tenants import ask_as, cost_of, priced_policy

    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(priced_policy(standins))  # acme: a $5 daily budget, priced backends
    assert gw.gateway.engine is not None
    spent = cost_of(gw, ask_as(gw, keys.create_key(gw.gateway.engine, "acme").key, "Hello?"))
    browser.delete_all_cookies()
    browser.get(gw.url + "/admin/keys")
    wait_for(browser, "input[type=password]")
    browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
    click_to_new_page(browser, By.CSS_SELECTOR, "button[type=submit]", "#tenant")
    browser.find_element(By.ID, "tenant").send_keys("acme")
    click_to_new_page(browser, By.ID, "create-key", "#new-key-value")
    key = browser.find_element(By.ID, "new-key-value").text
    key_id = browser.find_element(By.ID, "new-key").text.split("key #")[1].split(")")[0]
    # the tenants table: its limits, what it spent today, and its two live keys
    row = {
        cell: browser.find_element(By.CSS_SELECTOR, f"#tenant-acme td.{cell}").text
        for cell in ("priority", "rpm", "budget", "spent", "live-keys")
    }
    assert row["spent"].startswith(f"${spent:.4f} since ") and spent > 0
    assert [row[c] for c in ("priority", "rpm", "budget")] == ["batch", "100", "$5.00 / day"]
    assert row["live-keys"] == "2"
    snap(browser, "keys")
    models = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert models.status_code == 200
    click_to_new_page(browser, By.CSS_SELECTOR, f"#key-{key_id} button.revoke", "#keys")
    assert browser.find_element(By.CSS_SELECTOR, f"#key-{key_id} td.state").text == "revoked"
    assert browser.find_element(By.CSS_SELECTOR, "#tenant-acme td.live-keys").text == "1"
    assert key not in browser.page_source  # shown once, never again
    refused = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert refused.status_code == 401
    # the tenant's own limits, changed live from its edit page: one request a minute
    click_to_new_page(browser, By.CSS_SELECTOR, "#tenant-acme a.edit", "#limits")
    snap(browser, "tenant")
    limit = browser.find_element(By.ID, "requests_per_min")
    limit.clear()
    limit.send_keys("1")
    click_to_new_page(browser, By.ID, "save-limits", "#keys")
    assert browser.find_element(By.CSS_SELECTOR, "#tenant-acme td.rpm").text == "1"
    other = keys.create_key(gw.gateway.engine, "acme").key
    # in force at once, without a restart: the first request of the new window passes, the second not
    assert [ask_as_status(gw, other), ask_as_status(gw, other)] == [200, 429]


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
