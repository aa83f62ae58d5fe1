"""The operator page (``GET /operator``) in a real headless browser: Debian's chromium and its driver.

The real service (``onboardflow serve``, a process of its own) over the real
Redis, holding profiles written by the pipeline's writer in a deployment of
the test's own. The page keeps the API key the operator saves and calls the
API with it; these tests check what an operator (and anyone looking over
their shoulder) sees: a refusal without a key or without a scope, and after a
lookup the profile under its pseudonym, never the raw user id.

Needs `make browser` (chromium, chromium-driver) and selenium (the [test] extras).
"""
from __future__ import annotations

import re
import shutil
import uuid

import pytest
import redis

from onboardflow.tests.integration.api_service import ApiDeployment, ApiServer, seed_profiles, template_profiles

pytestmark = pytest.mark.integration

PORT = 8802
USER = "operator-test-user-0001"
OTHERS = [f"operator-test-user-{i:04d}" for i in range(2, 30)]


@pytest.fixture(scope="module")
def served(redis_url, tmp_path_factory):
    """(deployment, running server) with 29 profiles seeded, USER's among them."""
    deployment = ApiDeployment(f"i19page-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("operator"), redis_url)
    assert seed_profiles(deployment, [USER, *OTHERS], templates=template_profiles(users=12)) == 1 + len(OTHERS)
    try:
        with ApiServer(deployment, PORT) as server:
            yield deployment, server
    finally:
        deployment.clear_redis()


@pytest.fixture
def browser():
    """Headless chromium through chromedriver, both Debian's; a fresh profile (no saved key) per test."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "chromium and chromedriver are installed by `make browser`"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_text(driver, element_id: str, timeout_s: float = 30.0) -> str:
    """The text of ``#element_id`` once it is not empty."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s).until(lambda d: d.find_element(By.ID, element_id).text.strip())
    return driver.find_element(By.ID, element_id).text


def _open(driver, server: ApiServer, key=None) -> None:
    from selenium.webdriver.common.by import By

    driver.get(server.url + "/operator")
    if key is not None:
        driver.find_element(By.ID, "api-key").send_keys(key)
        driver.find_element(By.ID, "save-key").click()


def _look_up(driver, user_id: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "user-id")
    field.clear()
    field.send_keys(user_id)
    driver.find_element(By.ID, "lookup").click()


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def test_without_a_key_the_page_refuses_and_shows_no_data(served, browser):
    deployment, server = served
    _open(browser, server)
    _look_up(browser, USER)
    refusal = _wait_text(browser, "error")
    assert re.search(r"401|key", refusal, re.I), refusal
    user_key = deployment.pseudonymizer().user_key(USER)
    assert user_key not in browser.page_source
    assert not _text(browser, "profile").strip()
    from selenium.webdriver.common.by import By
    assert not browser.find_element(By.ID, "segments").find_elements(By.TAG_NAME, "td")


def test_a_key_the_service_does_not_know_is_refused_with_401(served, browser):
    deployment, server = served
    _open(browser, server, "obf_000000000000_" + "A" * 43)
    _look_up(browser, USER)
    refusal = _wait_text(browser, "error")
    assert "not valid" in refusal, refusal
    assert deployment.pseudonymizer().user_key(USER) not in browser.page_source
    assert USER not in browser.page_source


def test_with_a_key_a_lookup_shows_the_pseudonymous_profile_and_never_the_raw_id(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    deployment, server = served
    key = server.create_key(f"operator-{uuid.uuid4().hex[:6]}", ["profiles:read", "segments:read"])
    _open(browser, server, key)
    _look_up(browser, USER)
    user_key = deployment.pseudonymizer().user_key(USER)
    WebDriverWait(browser, 30).until(lambda d: user_key in d.find_element(By.ID, "profile").text)
    assert not _text(browser, "error").strip()

    # The raw id is at most in the input field the operator typed it into (its value, not the DOM; the page
    # may clear it once sent), and nowhere else.
    assert browser.find_element(By.ID, "user-id").get_attribute("value") in ("", USER)
    assert USER not in browser.page_source
    assert USER not in browser.find_element(By.TAG_NAME, "body").text
    assert USER not in browser.execute_script("return document.documentElement.outerHTML")

    # Segment sizes as Redis holds them: every non-empty segment set of the deployment, by name.
    client = redis.Redis.from_url(deployment.redis_url)
    try:
        sizes = {k.decode().split(":segment:", 1)[1]: client.scard(k)
                 for k in client.scan_iter(match=f"{deployment.prefix}:segment:*", _type="set")}
    finally:
        client.close()
    assert sizes, "the seeded profiles are in segments"
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "segments").find_elements(By.TAG_NAME, "td"))
    rows = {}
    for row in browser.find_element(By.ID, "segments").find_elements(By.TAG_NAME, "tr"):
        cells = [c.text.strip() for c in row.find_elements(By.TAG_NAME, "td")]
        if len(cells) >= 2:
            rows[cells[0]] = int(cells[1].replace(",", ""))
    assert {name: size for name, size in rows.items() if size} == sizes
    assert _wait_text(browser, "models").strip()
    assert _wait_text(browser, "lag").strip()


def test_a_key_without_the_scope_is_refused_with_403(served, browser):
    deployment, server = served
    key = server.create_key(f"operator-{uuid.uuid4().hex[:6]}", ["segments:read"])
    _open(browser, server, key)
    _look_up(browser, USER)
    refusal = _wait_text(browser, "error")
    assert "403" in refusal or "profiles:read" in refusal, refusal
    assert deployment.pseudonymizer().user_key(USER) not in _text(browser, "profile")
    assert USER not in browser.page_source
