"""The web chat page in real headless Chromium (Selenium + chromium-driver)."""

import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from app.settings import DEFAULT_KV_DTYPE  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian chromium + chromium-driver")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_send_a_message_and_see_the_reply_stream_in(server, browser):
    browser.get(server.url + "/")
    browser.find_element(By.ID, "session-name").send_keys("web-1")
    browser.find_element(By.ID, "session-policy").send_keys("h2o_4_16_64")
    browser.find_element(By.ID, "new-session").click()
    browser.find_element(By.ID, "max-new-tokens").clear()
    browser.find_element(By.ID, "max-new-tokens").send_keys("40")
    browser.find_element(By.ID, "message").send_keys("Hello from the browser")
    browser.find_element(By.ID, "send").click()

    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
    # Text appears while the turn is still streaming (before its stats line), then keeps growing.
    partial = wait.until(lambda d: reply.text if reply.text and not d.find_elements(By.CSS_SELECTOR, ".stats")
                         else None)
    stats = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".stats"))[0].text
    assert "TTFT" in stats and "TPOT" in stats and "/72" in stats  # h2o_4_16_64 + slack 8
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello from the browser"

    with server.client() as client:
        session = client.get("/sessions/web-1").json()
    assert session["policy"] == f"h2o_4_16_64_{DEFAULT_KV_DTYPE}" and session["turns"] == 1  # the server's storage
    assert reply.text.startswith(partial.rstrip()) and len(reply.text) > len(partial)
    assert "40 generated tokens" in stats
    assert "web-1" in browser.find_element(By.ID, "sessions").text
