"""The console's fixtures: a gateway with an admin key, and the helpers its tests share."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from icgate.gateway.config import Policy
from tests.gateway.conftest import RunningGateway, Standins, standin_policy

ADMIN_KEY = "admin-key-for-tests-7f3a"
StartGateway = Callable[[Policy], RunningGateway]
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def console(
    standins: Standins, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningGateway]:
    monkeypatch.setenv("ICGATE_ADMIN_KEY", ADMIN_KEY)
    yield start_gateway(standin_policy(standins, "http"))


def logged_in(gw: RunningGateway) -> httpx.Client:
    client = httpx.Client(base_url=gw.url, follow_redirects=False)
    resp = client.post("/admin/login", data={"key": ADMIN_KEY, "next": "/admin/requests"})
    assert resp.status_code == 303 and resp.headers["location"] == "/admin/requests"
    return client


def ask(gw: RunningGateway, content: str = "What is the capital of France?") -> str:
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": content}]},
        timeout=30,
    )
    assert resp.status_code == 200
    return resp.headers["x-icgate-request-id"]


def wait_logged(gw: RunningGateway, request_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        resp = httpx.get(
            f"{gw.url}/admin/api/requests/{request_id}", headers={"authorization": f"Bearer {ADMIN_KEY}"}
        )
        if resp.status_code == 200 or time.monotonic() > deadline:
            assert resp.status_code == 200, resp.text
            body: dict[str, object] = resp.json()
            return body
        time.sleep(0.05)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
