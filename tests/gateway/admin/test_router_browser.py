"""The router page in a real headless Chromium: move the knob and see the projection change in place, then
apply it and see it in force.

`ICGATE_SCREENSHOTS=docs/admin .venv/bin/pytest tests/gateway/admin/test_router_browser.py` saves the page
as docs/admin/router.png.
"""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.gateway.admin.browsing import click_to_new_page, log_in, snap, wait_for
from tests.gateway.admin.conftest import ADMIN_KEY, StartGateway
from tests.gateway.admin.test_router_page import EASY, HARD, learned_policy, send_routed
from tests.gateway.conftest import Standins


def shown(browser: WebDriver, key: str) -> str:
    return str(browser.find_element(By.CSS_SELECTOR, f"[data-proj='{key}']").text)


def share(text: str) -> float:
    return float(text.rstrip("%")) / 100


def changes_to(browser: WebDriver, key: str, before: str) -> str:
    """Wait until the page's script has put a new number in `key` (it fetches it after a move)."""
    WebDriverWait(browser, 15).until(lambda b: shown(b, key) != before)
    return shown(browser, key)


def test_move_the_router_knob_and_see_the_projection_change(
    browser: WebDriver, standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    gw = start_gateway(learned_policy(standins))
    rows = send_routed(gw, EASY + HARD)
    logged_large = sum(r["route"] == "large" for r in rows) / len(rows)
    browser.delete_all_cookies()
    log_in(browser, gw, "/admin/router")
    wait_for(browser, "#projection")
    start = shown(browser, "candidate.large_share")
    assert (
        share(start) == pytest.approx(logged_large, abs=1e-3) == share(shown(browser, "logged.large_share"))
    )
    cost = shown(browser, "candidate.cost_usd")
    mark = browser.find_element(By.ID, "mark-candidate").get_attribute("cx")

    knob = browser.find_element(By.ID, "knob-value")
    knob.send_keys(Keys.END)  # the threshold to 1: everything below it goes large
    higher = changes_to(browser, "candidate.large_share", start)
    assert share(higher) == 1.0 > share(start)
    assert float(shown(browser, "candidate.cost_usd").lstrip("$")) > float(cost.lstrip("$"))
    assert shown(browser, "candidate.threshold") == "1.0000"
    assert shown(browser, "current.large_share") == start  # the knob in force has not moved
    moved = browser.find_element(By.ID, "mark-candidate").get_attribute("cx")
    assert mark is not None and moved is not None and float(moved) > float(mark)  # along the curve, right

    knob.send_keys(Keys.HOME)  # the threshold to 0: nothing goes large
    lower = changes_to(browser, "candidate.large_share", higher)
    assert share(lower) == 0.0 < share(start)

    # As a strong share: half of the replayed requests go large.
    browser.find_element(By.CSS_SELECTOR, "#knob-mode option[value='strong_share']").click()
    browser.execute_script(
        "var v = document.getElementById('knob-value'); v.value = '0.5';"
        "v.dispatchEvent(new Event('input', { bubbles: true }));"
    )
    half = changes_to(browser, "candidate.large_share", lower)
    assert share(half) == pytest.approx(0.5)
    assert "mode=strong_share" in browser.current_url and "value=0.5" in browser.current_url
    browser.execute_script("document.getElementById('knob').scrollIntoView()")
    snap(browser, "router")

    # Apply it: the page comes back with the knob in force where the candidate was.
    click_to_new_page(browser, By.ID, "apply", "#notice")
    assert "Applied as policy version" in browser.find_element(By.ID, "notice").text
    assert shown(browser, "current.large_share") == half
    assert gw.gateway.pipeline.policy.router.threshold is not None
    assert "router-knob" in browser.find_element(By.ID, "history").text
