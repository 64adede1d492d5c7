"""The web demo in a real headless Chromium: upload an image, ask, read the streamed answer,
continue the conversation, reset. Saves a screenshot web-demo.png (in the test's tmp folder,
or $BUNNY_SCREENSHOT_DIR)."""
import os
import shutil
from pathlib import Path

import httpx
import pytest

from bunny.serve.app import ServerSettings, create_app
from bunny.serve.server import running_server
from bunny.testing import make_tiny_bunny, random_image

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian's chromium and chromium-driver are not installed "
                                       "(apt-get install -y chromium chromium-driver)")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # An explicit driver path: selenium-manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_upload_ask_stream_continue_reset(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model, processor = make_tiny_bunny(seed=3)
    image = tmp_path / "shapes.png"
    random_image(4, (64, 48)).save(image)
    with running_server(create_app(model, processor, ServerSettings(model_name="tiny"))) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("12")
        browser.find_element(By.ID, "image").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())

        def ask(question):
            browser.find_element(By.ID, "question").send_keys(question)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text in ("done", "error"))
            assert browser.find_element(By.ID, "status").text == "done"
            return [e.get_attribute("textContent").strip() for e in browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")]

        first = ask("What is in the image?")
        # The page's streamed answer equals the API's non-streamed one for the same request.
        with open(image, "rb") as f:
            import base64
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        api = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the image?"}]}]})
        assert first == [api.json()["choices"][0]["message"]["content"]]

        second = ask("And the colour?")  # continues the conversation
        assert len(second) == 2 and len(browser.find_elements(By.CSS_SELECTOR, "#log .msg.user")) == 2
        out = Path(os.environ.get("BUNNY_SCREENSHOT_DIR", tmp_path)) / "web-demo.png"
        browser.save_screenshot(str(out))
        assert out.stat().st_size > 1000

        browser.find_element(By.ID, "reset").click()
        assert browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []
