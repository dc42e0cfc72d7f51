"""The page at GET / in a real browser: Debian's chromium, headless, driven by Selenium.

Upload an image and read the bars, generate a completion and read the streamed text, each
checked against the API's own answer; the card shows the run's method, base and plot. A
screenshot is kept in the test's folder, and copied to $LORACLI_SCREENSHOT_DIR when set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.serve.runs import png_bytes
from tests.serve.server_proc import ServerProcess

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    assert CHROMIUM and DRIVER, "the page test needs Debian's browser: apt-get install chromium chromium-driver"
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium must not try to fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_classifies_an_upload_and_streams_a_completion(serve_runs, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    runs = {name: serve_runs[name] for name in ("img-a", "img-b", "lm-a")}
    server = ServerProcess(runs, tmp_path / "serve.log").wait_ready()
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(server.url + "/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#run option")) == 3)
        Select(browser.find_element(By.ID, "run")).select_by_value("img-a")
        wait.until(lambda d: d.find_element(By.ID, "card-title").text == "img-a"
                   and d.find_elements(By.CSS_SELECTOR, "#card-plots img"))
        facts = browser.find_element(By.ID, "card-facts").text
        assert "lora" in facts and "random-init vit" in facts and "img-b" in facts

        image = tmp_path / "cake.png"
        image.write_bytes(png_bytes(2))
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 3)
        shown = [(li.get_attribute("data-label"), li.find_element(By.CLASS_NAME, "value").text)
                 for li in browser.find_elements(By.CSS_SELECTOR, "#results li")]
        api = httpx.post(f"{server.url}/v1/classify", data={"model": "img-a", "top_k": "5"},
                         files={"image": ("cake.png", image.read_bytes(), "image/png")}, timeout=60).json()
        assert shown == [(row["label"], f"{100 * row['probability']:.1f}%") for row in api["top_k"]]
        for li, row in zip(browser.find_elements(By.CSS_SELECTOR, "#results li"), api["top_k"]):
            bar, track = li.find_element(By.CLASS_NAME, "bar"), li.find_element(By.CLASS_NAME, "track")
            assert bar.size["width"] == pytest.approx(row["probability"] * track.size["width"], abs=2)
        plot = browser.find_element(By.CSS_SELECTOR, "#card-plots img")
        assert browser.execute_script("return arguments[0].naturalWidth", plot) == 120  # the run's PNG, decoded
        shot = tmp_path / "serve-page.png"
        assert browser.save_screenshot(str(shot))

        Select(browser.find_element(By.ID, "run")).select_by_value("lm-a")
        wait.until(lambda d: d.find_element(By.ID, "card-title").text == "lm-a")
        browser.find_element(By.ID, "text").send_keys("the film was")
        for field, value in (("max-tokens", "8"), ("temperature", "0")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text in ("done",) or "error" in
                   (d.find_element(By.ID, "status").get_attribute("class") or ""))
        assert browser.find_element(By.ID, "status").text == "done"
        expected = httpx.post(f"{server.url}/v1/completions", json={"model": "lm-a", "prompt": "the film was",
                                                                    "max_tokens": 8, "temperature": 0}, timeout=60).json()
        assert browser.find_element(By.ID, "completion").text == expected["choices"][0]["text"].strip()
        browser.save_screenshot(str(tmp_path / "serve-page-completion.png"))
    finally:
        assert server.terminate() == 0
    keep = os.environ.get("LORACLI_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("serve-page*.png"):
            shutil.copy(png, Path(keep) / png.name)
