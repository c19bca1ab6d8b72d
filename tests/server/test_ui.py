"""The feature explorer and playground at /ui, in a real headless chromium driven by selenium (Debian's
chromium and chromedriver: nothing is downloaded). SAE_SERVE_UI_SCREENSHOTS=DIR saves each view as
DIR/ui-*.png (how docs/ui-*.png are made)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.server.harness import API_KEY, AUTH

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Debian's chromium and chromium-driver are not installed (make install-system)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402  (after the skip: selenium alone is no use without chromium)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SCREENSHOTS = os.environ.get("SAE_SERVE_UI_SCREENSHOTS")


@pytest.fixture(scope="module")
def browser(server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    # The key is in localStorage before the page's own script runs, as a user's stored key would be.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                           {"source": f"localStorage.setItem('sae_serve_api_key', {json.dumps(API_KEY)})"})
    driver.get(server.base + "/ui/")
    wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results tbody tr"))
    yield driver
    driver.quit()


def wait(driver, seconds: float = 60) -> WebDriverWait:
    """Polls until a condition holds; an element the page re-rendered meanwhile is looked up again."""
    from selenium.common.exceptions import StaleElementReferenceException

    return WebDriverWait(driver, seconds, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))


def text(driver, selector: str) -> str:
    """The element's text as the DOM has it (selenium's .text trims the completions' leading space)."""
    return driver.find_element(By.CSS_SELECTOR, selector).get_attribute("textContent")


def screenshot(driver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / f"ui-{name}.png"))


def run_playground(driver, feature: str, strength: str) -> None:
    driver.get(driver.current_url.split("#")[0] + "#playground")
    driver.execute_script("""
        document.querySelector('#prompt').value = 'My favourite food is';
        document.querySelector('#max-tokens').value = '8';
        document.querySelector('.intervention .feature').value = arguments[0];
        document.querySelector('.intervention .strength').value = arguments[1];
        document.querySelector('#status').textContent = '';""", feature, strength)
    driver.find_element(By.ID, "run").click()
    wait(driver).until(lambda d: text(d, "#status").startswith(("done", "failed")))


def test_page_loads_without_console_errors(browser, server):
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    assert "layer15" in text(browser, "#sae-info")
    # The page is public (it loads before a key is typed); its data is not.
    assert httpx.get(server.base + "/ui", follow_redirects=True).status_code == 200
    assert httpx.get(server.base + "/v1/features/layer15").status_code == 401
    screenshot(browser, "explorer")


def test_search_finds_a_feature_and_its_page(browser):
    box = browser.find_element(By.ID, "search-q")
    box.clear()
    box.send_keys("non-english\n")
    row = '#search-results tbody tr[data-feature="4563"]'
    wait(browser).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#search-results tbody tr")) == 1
                        and d.find_elements(By.CSS_SELECTOR, row))
    assert "non-english" in text(browser, row)
    browser.find_element(By.CSS_SELECTOR, row).click()
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-examples mark"))
    assert text(browser, "#feature-title").endswith("4563: non-english")
    assert "7.626" in text(browser, "#feature-card")  # max activation, from features.json
    assert browser.find_elements(By.CSS_SELECTOR, "#feature-quantiles mark")
    assert browser.find_elements(By.CSS_SELECTOR, "#feature-promoted code")
    screenshot(browser, "feature")


def test_contrastive_search_ranks_the_language_feature(browser):
    browser.get(browser.current_url.split("#")[0] + "#explorer")
    browser.find_element(By.CSS_SELECTOR, "#contrastive summary").click()
    browser.find_element(By.ID, "contrast-run").click()  # the page's own French vs English texts
    rows = "#contrast-results tbody tr"
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, rows))
    ranked = [r.get_attribute("data-feature") for r in browser.find_elements(By.CSS_SELECTOR, rows)]
    assert "4563" in ranked[:5], ranked


def test_playground_steers_and_the_copied_request_reproduces_it(browser, server):
    run_playground(browser, "non-english", "1")
    plain, steered = text(browser, "#out-plain"), text(browser, "#out-steered")
    assert text(browser, "#status").startswith("done"), text(browser, "#error")
    assert steered.startswith(" la la") and steered != plain
    cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap td")
    assert len(cells) >= 4 + 7  # prompt tokens, then the generated ones fed back
    screenshot(browser, "playground")

    curl = text(browser, "#copy-box")
    body = json.loads(re.search(r"-d '(.*)'$", curl, re.S).group(1).replace("'\\''", "'"))
    assert body["steering"]["interventions"][0] == {"sae": "layer15", "feature": "non-english", "mode": "clamp",
                                                    "multiple_of_max": 1}
    got = ""
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += json.loads(line[6:])["choices"][0]["text"]
    assert got == steered


@pytest.mark.parametrize(("feature", "strength", "message"), [
    ("non-english", "100", "steering.interventions[0].multiple_of_max: |100.0| exceeds this server's limit"),
    ("no-such-feature", "1", "no feature is labelled 'no-such-feature'"),
])
def test_bad_input_shows_the_servers_error(browser, feature, strength, message):
    run_playground(browser, feature, strength)
    assert text(browser, "#status") == "failed"
    assert "HTTP 400" in text(browser, "#error") and message in text(browser, "#error")


def test_watchlist_shows_firing_rates(browser):
    browser.get(browser.current_url.split("#")[0] + "#watchlist")
    rows = '#watch-table tbody tr[data-feature="military"] td'

    def cells(d) -> list[str]:  # read in one go: the table is re-rendered on every poll of /metrics
        return d.execute_script("return Array.from(document.querySelectorAll(arguments[0]), c => c.textContent)",
                                rows)

    wait(browser).until(lambda d: len(cells(d)) == 7)
    assert int(float(cells(browser)[2])) > 0  # the playground's requests were watched
    wait(browser, 30).until(lambda d: len(c := cells(d)) == 7 and c[6].strip() != "–")  # a second poll
    screenshot(browser, "watchlist")
