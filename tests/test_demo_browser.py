"""The Gradio demo (`app.py`) driven in a real headless Chromium: type a prompt, start, send a correction while the
answer streams, and check what the panes show.

Needs Debian's Chromium (`apt-get install -y chromium`) and Playwright for Python (in requirements.txt). Without
Chromium the test is skipped, except where DUPLEX_REQUIRE_BROWSER=1 (CI sets it), where it fails.
Set DUPLEX_SCREENSHOT=docs/demo.png to keep the screenshot it takes.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DUPLEX_CHROMIUM", "/usr/bin/chromium")
PROMPT, CORRECTION = "Name 5 tools.", "Name animals instead."


pytestmark = pytest.mark.timeout(600)


def require_browser() -> None:
    """Skip (or, under DUPLEX_REQUIRE_BROWSER=1, fail) with how to install what is missing."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright for Python (pip install -r requirements.txt)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("DUPLEX_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def start_demo() -> tuple[subprocess.Popen, str]:
    """`python app.py` on a free port; another process may take that port between our check and its bind, so a
    start that exits early is retried on a new port (up to three times)."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    for _attempt in range(3):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "app.py", "--trust-remote-code", "--port", str(port), "--chat-pace-ms", "150"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        if process.poll() is None:
            process.terminate()
            pytest.fail("app.py did not answer within 240 s")
        output = process.stdout.read()
        if "address already in use" not in output.lower() and "empty port" not in output.lower():
            pytest.fail(f"app.py exited with {process.returncode}:\n{output[-3000:]}")
    pytest.fail("app.py found no free port in three tries")


@pytest.fixture(scope="module")
def demo_url():
    """`python app.py --trust-remote-code` as a user starts it (the shipped checkpoint, 127.0.0.1)."""
    require_browser()
    process, url = start_demo()
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


PANE_TEXT = """name => {
    const pane = document.querySelector(`[data-pane=${name}]`);
    const marker = pane.querySelector('.landing');
    const out = [...pane.querySelectorAll('.out')];
    const after = marker ? out.filter(o => marker.compareDocumentPosition(o) & Node.DOCUMENT_POSITION_FOLLOWING) : [];
    return {
        text: out.map(o => o.textContent).join(''),
        after: after.map(o => o.textContent).join(''),
        marker: marker ? {cls: marker.className, at: marker.dataset.at, label: marker.textContent} : null,
    };
}"""


@pytest.mark.slow
def test_a_correction_sent_while_it_streams_lands_in_every_pane(demo_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 840})
            page.goto(demo_url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#pace input[type=number]").fill("150")  # slow enough to correct mid-answer on a busy CI
            page.locator("#pace input[type=number]").press("Enter")
            page.locator("#start").click()
            page.wait_for_function(  # "ham" has streamed: the correction lands inside a word, as users send them
                "(document.querySelector('[data-pane=workspace] .out')?.textContent || '').length >= 3",
                timeout=120_000,
            )
            page.locator("#correction textarea").fill(CORRECTION)
            page.locator("#send").click()
            page.wait_for_function(
                "[...document.querySelectorAll('.duplex-pane')].filter(p => p.dataset.done === 'true').length === 4",
                timeout=180_000,
            )
            panes = {name: page.evaluate(PANE_TEXT, name) for name in ("workspace", "inband", "restart", "ignore")}
            page.screenshot(path=os.environ.get("DUPLEX_SCREENSHOT") or str(tmp_path / "demo.png"))
        finally:
            browser.close()

    workspace, ignored = panes["workspace"], panes["ignore"]
    assert workspace["marker"] is not None, panes
    assert workspace["marker"]["cls"] == "landing applied" and CORRECTION in workspace["marker"]["label"]
    at = int(workspace["marker"]["at"])
    assert at >= 3, "sent after three characters had streamed, it cannot land before them"
    assert f"landed at token {at}," in workspace["marker"]["label"] and workspace["marker"]["label"].endswith(" ms")
    assert workspace["text"][:at] == ignored["text"][:at]  # byte-level tokenizer, ASCII: token i is character i
    assert workspace["after"] == workspace["text"][at:]
    assert workspace["after"] != ignored["text"][at:], panes  # the correction changed what the model wrote
    assert ignored["marker"]["cls"] == "landing ignored"
    assert panes["inband"]["marker"]["cls"] == "landing applied"
    restart = panes["restart"]["marker"]
    assert restart["cls"] == "landing restart" and "re-prefill" in restart["label"] and restart["label"].endswith(" ms")
    assert panes["restart"]["after"] and panes["restart"]["after"] == panes["restart"]["text"]


CHAT_TEXT = "() => [...document.querySelectorAll('#chatbot .message')].map(m => m.textContent).join('\\n')"


@pytest.mark.slow
def test_a_chat_answer_takes_a_correction_typed_while_it_streams(demo_url, tmp_path):
    """The chat tab: a message in the model's chat template; a correction typed while the answer streams lands in
    it, marked where it landed with the model's decision and its latency, and the answer goes on after it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 840})
            page.goto(demo_url)
            page.get_by_role("tab", name="Chat").click()
            page.locator("#chat-message textarea").fill(PROMPT)
            page.locator("#chat-message textarea").press("Enter")
            page.wait_for_function(f"({CHAT_TEXT})().length >= {len(PROMPT) + 4}", timeout=120_000)
            page.locator("#chat-correction textarea").fill(CORRECTION)
            page.locator("#chat-send").click()
            landed = f"/⟨{CORRECTION} · correction, [0-9]+ ms⟩.+, .+, .+/"  # marked, and two more items after it
            page.wait_for_function(f"{landed}.test(({CHAT_TEXT})())", timeout=180_000)
            text = page.evaluate(CHAT_TEXT)
            page.screenshot(path=os.environ.get("DUPLEX_CHAT_SCREENSHOT") or str(tmp_path / "chat.png"))
        finally:
            browser.close()
    before, after = text.split(f"⟨{CORRECTION}", 1)
    assert PROMPT in before and before.strip() != PROMPT, text  # the answer had begun when the correction landed
    assert after.split("⟩", 1)[1].strip(), text  # and went on after it
