"""The chat page in headless Chromium: API key, a streamed reply, the stats panel.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; nothing is
downloaded. With LOGQUANT_SCREENSHOT set, the page talks to the real default model and the
screenshot also goes to docs/chat-page.png (for the README).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serving import running_server

pytest.importorskip("fastapi", reason="needs the server extra: pip install 'logquant-gguf[server]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip)")
By = pytest.importorskip("selenium.webdriver.common.by").By
WebDriverWait = pytest.importorskip("selenium.webdriver.support.ui").WebDriverWait

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
API_KEY = "browser-key"
README_SHOT = Path(__file__).resolve().parent.parent / "docs" / "chat-page.png"
SCREENSHOT = bool(os.environ.get("LOGQUANT_SCREENSHOT"))

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Chromium and its driver: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    if SCREENSHOT:
        model, n_ctx = request.getfixturevalue("real_model"), 2048
    else:
        model, n_ctx = request.getfixturevalue("tiny_model"), 256
    with running_server(model, tmp_path_factory.mktemp("browser-server"), kv_type="q8_0",
                        n_ctx=n_ctx, api_key=API_KEY, startup_s=180) as s:
        yield s


@pytest.fixture
def browser(tmp_path):
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def text_of(driver, css: str) -> str:
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)


def test_page_streams_a_reply_and_shows_cache_stats(server, browser, tmp_path):
    wait = WebDriverWait(browser, 120 if SCREENSHOT else 30)
    browser.get(server.url + "/")

    # The server wants a key: the page says so, and works once it is given.
    wait.until(lambda d: d.find_element(By.ID, "notice").is_displayed())
    assert "API key" in text_of(browser, "#notice")
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda d: text_of(d, "#model-name") == server.model)
    assert not browser.find_element(By.ID, "notice").is_displayed()

    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("300" if SCREENSHOT else "24")
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    question = ("Write a Python function that checks whether a number is prime. Be brief."
                if SCREENSHOT else "Hello, model")
    browser.find_element(By.ID, "prompt").send_keys(question)
    browser.find_element(By.ID, "send").click()

    # Streaming: the reply is marked as streaming (with the Stop button shown) while text
    # arrives, and settles into the history when done.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
    assert text_of(browser, ".msg.user .body") == question
    reply = text_of(browser, ".msg.assistant .body")
    assert reply, "no streamed text"
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.error")
    assert browser.find_element(By.ID, "send").is_displayed()
    assert float(text_of(browser, "#stat-tps")) > 0
    assert int(text_of(browser, "#stat-reply-tokens")) > 1
    history = browser.execute_script(
        "return JSON.parse(sessionStorage.getItem('logquant-chat-history'))")
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == question and history[1]["content"]

    # The stats panel, filled from /logquant/stats.
    wait.until(lambda d: text_of(d, "#stat-kv-type") == "q8_0"
               and text_of(d, "#stat-tokens") not in ("—", "0"))
    assert int(text_of(browser, "#stat-n-ctx")) == (2048 if SCREENSHOT else 256)
    assert text_of(browser, "#stat-bytes") != "—"
    assert text_of(browser, "#kv-badge") == "kv q8_0"

    browser.execute_script("document.getElementById('settings').open = false;"
                           "document.getElementById('panel').scrollTop = 0;")
    browser.save_screenshot(str(tmp_path / "chat-page.png"))
    if SCREENSHOT:
        README_SHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(README_SHOT))
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
            "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        browser.save_screenshot(str(tmp_path / "chat-page-dark.png"))


# A reply that sends one piece and then waits forever, so Stop is always pressed mid-stream.
ENDLESS_REPLY = """
const realFetch = window.fetch;
window.fetch = (url, opts) => {
  if (!String(url).includes("chat/completions")) return realFetch(url, opts);
  const piece = 'data: {"choices":[{"delta":{"content":"partial"}}]}\\n\\n';
  const body = new ReadableStream({ start(c) {
    c.enqueue(new TextEncoder().encode(piece));
    opts.signal.addEventListener("abort", () => c.error(new DOMException("aborted", "AbortError")));
  } });
  return Promise.resolve(new Response(body, { headers: { "Content-Type": "text/event-stream" } }));
};
"""


def test_stop_button_aborts_a_reply_and_keeps_what_was_said(server, browser):
    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    browser.execute_script(
        "localStorage.setItem('logquant-chat', JSON.stringify({apiKey: arguments[0]}));", API_KEY)
    browser.refresh()
    wait.until(lambda d: text_of(d, "#model-name") == server.model)
    browser.execute_script(ENDLESS_REPLY)
    browser.find_element(By.ID, "prompt").send_keys("Tell me a long story")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: text_of(d, ".msg.assistant .body") == "partial")
    assert browser.find_element(By.ID, "stop").is_displayed()
    assert not browser.find_element(By.ID, "send").is_displayed()
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
    assert text_of(browser, ".msg.assistant .meta") == "stopped"
    assert browser.find_element(By.ID, "send").is_displayed()
    history = browser.execute_script(
        "return JSON.parse(sessionStorage.getItem('logquant-chat-history'))")
    assert history == [{"role": "user", "content": "Tell me a long story"},
                       {"role": "assistant", "content": "partial"}]
