"""The policy editor in a real headless Chromium: an error typed into the policy is shown at its line as
you type, Apply refuses it at that line, and a fixed policy applies and becomes the version in force."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.gateway.admin.browsing import click_to_new_page, log_in, snap, wait_for
from tests.gateway.admin.conftest import ADMIN_KEY
from tests.gateway.conftest import Standins, standin_policy
from tests.gateway.test_live_policy import StartGateway, policy_file


def set_editor(browser: WebDriver, text: str) -> None:
    """Replace the editor's text the way typing would: the page's input listener runs."""
    editor = browser.find_element(By.ID, "editor")
    browser.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));", editor, text
    )


def test_a_policy_with_an_error_is_refused_at_its_line_and_a_fix_applies(
    browser: WebDriver,
    standins: Standins,
    start_gateway: StartGateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    policy = standin_policy(standins, "http")
    path = policy_file(tmp_path, policy)
    gw = start_gateway(policy, policy_path=path)
    browser.delete_all_cookies()
    log_in(browser, gw, "/admin/policy")
    wait_for(browser, "#editor")
    text = path.read_text()
    bad = text.replace("auth:\n  required: false\n", "auth:\n  required: false\n  colour: blue\n")
    line = bad.splitlines().index("  colour: blue") + 1
    set_editor(browser, bad)
    # checked as typed: the issue appears, at its line, without a submit
    WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#issues li"))
    issue = browser.find_element(By.CSS_SELECTOR, "#issues li")
    assert issue.get_attribute("data-line") == str(line)
    assert issue.text == f"line {line}, auth.colour: unknown key"
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center'})", issue
    )  # the screenshot's subject
    snap(browser, "policy")
    click_to_new_page(browser, By.ID, "apply", "#editor")
    assert browser.find_element(By.ID, "message").text == "Not applied."
    assert browser.find_element(By.CSS_SELECTOR, "#issues li").get_attribute("data-line") == str(line)
    assert path.read_text() == text  # nothing applied
    fixed = text.replace("auth:\n  required: false\n", "auth:\n  required: true\n")
    set_editor(browser, fixed)
    WebDriverWait(browser, 15).until(lambda b: "auth.required" in b.find_element(By.ID, "check").text)
    assert "Applies at once" in browser.find_element(By.ID, "check-ok").text
    click_to_new_page(browser, By.ID, "apply", "#versions")
    assert browser.find_element(By.CSS_SELECTOR, "#versions tr:nth-child(2) .in-force").text == "in force"
    assert path.read_text() == fixed
    refused = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert refused.status_code == 401  # in force at once: keys are now required
