"""The web chat page in real headless Chromium (Selenium + chromium-driver)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

import app
from app.settings import DEFAULT_KV_DTYPE

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - selenium is a dev dependency
    webdriver = None

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
STATIC = Path(app.__file__).parent / "static"
browser_test = pytest.mark.browser  # the test tier of tests that drive Chromium (tests/conftest.py)


@pytest.fixture
def make_browser():
    """Headless Chromium drivers, each with its own profile (its own localStorage: its own client id)."""
    if webdriver is None or not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs selenium and Debian chromium + chromium-driver")
    drivers = []

    def make():
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        driver.set_page_load_timeout(30)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()


@pytest.fixture
def browser(make_browser):
    return make_browser()


class Page:
    """The chat page in one browser, with waits on the page's own state (never on time)."""

    def __init__(self, driver, url: str):
        driver.get(url + "/")
        self.driver, self.url = driver, url
        self.wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        self.wait.until(lambda d: d.execute_script("return !!window.h2oChat"))

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def fill(self, element_id: str, value: str) -> None:
        field = self.driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)

    def idle(self) -> bool:
        return self.driver.find_element(By.ID, "send").is_enabled()

    def send(self, text: str) -> None:
        """Type a message, Enter sends it; wait until its reply is done and the page has read the session back."""
        stats = len(self.find_all(".stats"))
        box = self.driver.find_element(By.ID, "message")
        for i, line in enumerate(text.split("\n")):
            if i:
                box.send_keys(Keys.SHIFT, Keys.ENTER)  # Shift+Enter breaks the line
            box.send_keys(line)
        box.send_keys(Keys.ENTER)
        self.wait.until(lambda d: len(self.find_all(".stats")) == stats + 1 and self.idle())

    def current(self) -> str:
        return self.driver.find_element(By.ID, "current").text

    def texts(self, role: str) -> list[str]:
        return [self.source(m) for m in self.find_all(f".msg.{role}")]

    def source(self, element) -> str:
        return self.driver.execute_script("return window.h2oChat.sourceOf(arguments[0])", element)

    def client_id(self) -> str:
        return self.driver.execute_script("return localStorage.getItem('h2o-client-id')")

    def api(self, server):
        """An API client that is this browser (its X-H2O-Client id)."""
        return server.client(headers={"X-H2O-Client": self.client_id()})


def test_the_page_is_one_file_with_its_libraries_and_script_hashes_up_to_date():
    """index.html carries marked and DOMPurify (from app/static/vendor) and the CSP hashes of its scripts."""
    spec = importlib.util.spec_from_file_location("inline", STATIC / "vendor" / "inline.py")
    inline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inline)
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert inline.build(html) == html, "index.html is out of date: run python app/static/vendor/inline.py"
    assert "marked v18.3.0" in html and "DOMPurify 3.5.0" in html
    assert "http://" not in html.split("<script")[0] and "https://" not in html.split("<script")[0]


@browser_test
def test_send_a_message_and_see_the_reply_stream_in(server, browser):
    page = Page(browser, server.url)
    browser.find_element(By.ID, "session-name").send_keys("web-1")
    browser.find_element(By.ID, "session-policy").send_keys("h2o_4_16_64")
    browser.find_element(By.ID, "new-session").click()
    page.fill("max-new-tokens", "40")
    # Text appears while the turn is still streaming (before its stats line), then keeps growing: the page notes
    # what the reply shows at each change (a poll through WebDriver could miss a stream this short).
    browser.execute_script("""
        window.partials = [];
        new MutationObserver(() => {
            const reply = document.querySelector(".msg.assistant");
            if (reply && reply.innerText.trim() && !document.querySelector(".stats")) {
                window.partials.push(window.h2oChat.sourceOf(reply));
            }
        }).observe(document.getElementById("messages"), {childList: true, subtree: true});
    """)
    browser.find_element(By.ID, "message").send_keys("Hello from the browser")
    browser.find_element(By.ID, "send").click()

    wait = page.wait
    stats = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".stats"))[0].text
    reply = page.find(".msg.assistant")
    partials = browser.execute_script("return window.partials")
    assert partials, "the reply showed no text before its stats line"
    partial = partials[0]
    assert "TTFT" in stats and "TPOT" in stats and "/72" in stats  # h2o_4_16_64 + slack 8
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello from the browser"

    with server.client() as client:
        session = client.get("/sessions/web-1").json()
    assert session["policy"] == f"h2o_4_16_64_{DEFAULT_KV_DTYPE}" and session["turns"] == 1  # the server's storage
    final = page.source(reply)
    assert final.startswith(partial) and len(final) > len(partial)
    assert "40 generated tokens" in stats and f"{session['cache_tokens_seen']} seen" in stats
    wait.until(lambda d: "web-1" in d.find_element(By.ID, "sessions").text)


XSS_REPLY = (
    "Here is **bold** text and code:\n\n```python\nprint('hi')\n```\n\n"
    "<script>alert(1)</script>\n\n"
    "Inline <img src=x onerror=\"window.pwned='img'\"> and [a link](javascript:window.pwned='link') and "
    "![a picture](http://127.0.0.1:9/x.png)"
)


@browser_test
def test_replies_render_markdown_and_html_in_them_stays_inert(server, browser):
    """A stored reply holding markdown, a <script> and an onerror handler (put there with the OpenAI route: the
    stateless request's history is prefilled into a new session) renders as markdown with the HTML as text."""
    page = Page(browser, server.url)
    with page.api(server) as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "max_tokens": 4,
                "messages": [
                    {"role": "user", "content": "Show me markdown"},
                    {"role": "assistant", "content": XSS_REPLY},
                    {"role": "user", "content": "Thanks <img src=x onerror=\"window.pwned='user'\">"},
                ],
            },
        )
        assert response.status_code == 200, response.text
        (session,) = client.get("/sessions").json()["sessions"]
    browser.find_element(By.ID, "refresh").click()
    page.wait.until(lambda d: session["id"] in d.find_element(By.ID, "sessions").text)
    page.find("#sessions .open").click()
    strong = page.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant strong"))[0]

    first = page.find_all(".msg.assistant")[0]
    assert strong.text == "bold"
    code = first.find_element(By.CSS_SELECTOR, "pre > code")
    assert code.text == "print('hi')" and code.get_attribute("class") == "language-python"
    assert "<script>alert(1)</script>" in first.text  # shown as text
    assert "<img src=x onerror=\"window.pwned='img'\">" in first.text
    assert not page.find_all("#messages script, #messages img, #messages [onerror], #messages iframe")
    link = first.find_element(By.LINK_TEXT, "a link")
    assert not (link.get_attribute("href") or "").startswith("javascript:")
    picture = first.find_element(By.LINK_TEXT, "a picture")  # an image is a link: nothing is fetched for it
    assert picture.get_attribute("href") == "http://127.0.0.1:9/x.png" and picture.get_attribute("rel")
    assert "onerror" in page.find_all(".msg.user")[1].text
    assert browser.execute_script("return window.pwned ?? null") is None  # no handler ran; no alert is open

    # The same renderer on a streamed reply: a turn continues the session and renders as it streams.
    page.send("And one more")
    assert page.texts("user") == [
        "Show me markdown",
        "Thanks <img src=x onerror=\"window.pwned='user'\">",
        "And one more",
    ]
    assert page.find_all(".msg.assistant strong")[0].text == "bold"
    with page.api(server) as client:
        assert client.get(f"/sessions/{session['id']}").json()["turns"] == 2  # prefilled turn + the browser's
    assert browser.execute_script("return window.pwned ?? null") is None


@browser_test
def test_regenerate_forks_a_new_session_and_never_duplicates_a_turn(server, browser):
    page = Page(browser, server.url)
    page.fill("max-new-tokens", "8")
    page.send("first line\nsecond line")
    page.send("second question")
    old = page.current()
    with page.api(server) as client:
        before = client.get(f"/sessions/{old}").json()["messages"]

    page.find(".regenerate").click()
    page.wait.until(lambda d: page.current() != old and page.idle() and len(page.find_all(".stats")) == 2)

    new = page.current()
    with page.api(server) as client:
        messages = client.get(f"/sessions/{new}").json()["messages"]
        assert client.get(f"/sessions/{old}").json()["messages"] == before  # the original is left as it was
    assert [m["content"] for m in messages if m["role"] == "user"] == ["first line\nsecond line", "second question"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[:3] == before[:3]
    assert page.texts("user") == ["first line\nsecond line", "second question"]
    assert len(page.find_all(".msg.assistant")) == 2 and page.texts("assistant")[1] == messages[3]["content"]
    assert new in browser.find_element(By.ID, "sessions").text
    # The fork is a session like any other: the next turn continues it.
    page.send("third question")
    with page.api(server) as client:
        assert [m["content"] for m in client.get(f"/sessions/{new}").json()["messages"] if m["role"] == "user"] == [
            "first line\nsecond line",
            "second question",
            "third question",
        ]


@browser_test
def test_edit_and_resend_replaces_the_later_turns(server, browser):
    page = Page(browser, server.url)
    page.fill("max-new-tokens", "8")
    page.fill("system-prompt", "Answer briefly.")
    for text in ("one", "two", "three"):
        page.send(text)
    old = page.current()
    with page.api(server) as client:
        before = client.get(f"/sessions/{old}").json()["messages"]
    assert [m["role"] for m in before] == ["system"] + ["user", "assistant"] * 3

    page.find_all(".turn.user .edit")[1].click()
    editor = page.find(".edit-text")
    assert editor.get_attribute("value") == "two"
    editor.clear()
    editor.send_keys("two, edited", Keys.ENTER)
    page.wait.until(lambda d: page.current() != old and page.idle() and len(page.find_all(".stats")) == 2)

    assert page.texts("user") == ["one", "two, edited"] and len(page.find_all(".msg.assistant")) == 2
    with page.api(server) as client:
        messages = client.get(f"/sessions/{page.current()}").json()["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[:3] == before[:3] and messages[3]["content"] == "two, edited"
    assert page.texts("assistant") == [before[2]["content"], messages[4]["content"]]


@browser_test
def test_stop_ends_the_stream_and_the_generation(server, browser):
    page = Page(browser, server.url)
    page.fill("max-new-tokens", "2000")
    browser.find_element(By.ID, "message").send_keys("Tell me everything", Keys.ENTER)
    # Click Stop from inside the page as soon as the reply shows text: the 2,000 tokens take seconds, a click
    # through WebDriver on a busy machine could come after the last of them.
    browser.set_script_timeout(60)
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const check = () => {
            const reply = document.querySelector(".msg.assistant");
            if (!reply || !window.h2oChat.sourceOf(reply)) return false;
            observer.disconnect();
            document.getElementById("stop").click();
            done();
            return true;
        };
        const observer = new MutationObserver(check);
        if (!check()) observer.observe(document.getElementById("messages"), {childList: true, subtree: true});
    """)
    page.find(".msg.assistant")
    page.wait.until(lambda d: page.find_all(".note") and page.idle())

    assert "stopped" in page.find(".note").text and not page.find_all(".stats")
    with page.api(server) as client:
        session = client.get(f"/sessions/{page.current()}").json()
    assert not session["busy"] and session["turns"] == 1
    assert session["cache_tokens_seen"] < 2000  # cut well before max tokens
    assert session["messages"][1]["role"] == "assistant" and session["messages"][1]["content"]  # kept as far as it got
    # The server ended the generation: the session takes the next turn (no 409 session_busy).
    page.fill("max-new-tokens", "4")
    page.send("Shorter, please")
    assert not page.find_all(".error")


@browser_test
def test_each_browser_sees_only_its_own_sessions(server, make_browser):
    pages = [Page(make_browser(), server.url), Page(make_browser(), server.url)]
    assert pages[0].client_id() != pages[1].client_id()
    for page, name in zip(pages, ("mine-a", "mine-b")):
        page.fill("session-name", name)
        page.find("#new-session").click()
        page.fill("max-new-tokens", "4")
        page.send(f"hello from {name}")
    for page, (mine, theirs) in zip(pages, (("mine-a", "mine-b"), ("mine-b", "mine-a"))):
        page.find("#refresh").click()
        page.wait.until(lambda d, mine=mine: mine in d.find_element(By.ID, "sessions").text)
        assert theirs not in page.driver.find_element(By.ID, "sessions").text

    # Delete (after a confirm): gone from the list and from the server; the other browser's session stays.
    page = pages[1]
    page.find("#sessions .delete").click()
    page.driver.switch_to.alert.accept()
    page.wait.until(lambda d: "mine-b" not in d.find_element(By.ID, "sessions").text and page.current() == "new chat")
    assert not page.find_all(".turn")
    with server.client() as client:
        assert client.get("/sessions/mine-b").status_code == 404
        assert client.get("/sessions/mine-a").status_code == 200
    # New chat clears the page; the next message starts a new session.
    pages[0].find("#new-session").click()
    pages[0].wait.until(lambda d: not pages[0].find_all(".turn") and pages[0].current() == "new chat")
