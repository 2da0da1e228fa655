"""The playground page in headless Chromium (Debian's, driven by Playwright): drop the example image, ask, watch
the answer stream in, and stop a long answer (which cancels the request on the server)."""

import base64
import json
import shutil
from pathlib import Path

import pytest
from server_process import EXAMPLES, ServerProcess

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def server():
    process = ServerProcess()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


DROP = """async (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], "red_circle.png", { type: "image/png" }));
    return transfer;
}"""


STOP_ON_FIRST_TEXT = """() => {
    const observer = new MutationObserver(() => {
        const text = document.querySelector('.turn.assistant .text');
        if (text && text.textContent.length > 0) {
            observer.disconnect();
            const stop = document.querySelector('#stop');
            window.stoppedWhileStreaming = !stop.disabled;
            stop.click();
        }
    });
    observer.observe(document.body, { childList: true, subtree: true, characterData: true });
}"""


def test_drop_ask_stream_and_stop(server, browser):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server.base_url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.input_value("#model") == "idefics-demo"

    image = base64.b64encode((EXAMPLES / "red_circle.png").read_bytes()).decode()
    page.dispatch_event("#drop", "drop", {"dataTransfer": page.evaluate_handle(DROP, image)})
    page.wait_for_selector("#thumbs img")
    page.fill("#question", "What color is the shape?")
    page.click("#send")
    page.wait_for_function("document.querySelector('#status').textContent.includes('(stop)')")
    assert page.text_content(".turn.assistant .text") == "Red."
    assert page.locator(".turn.user img").count() == 1 and page.locator("#thumbs img").count() == 0

    # a long answer (the demo model ends early, so ignore_eos is added on the way out), stopped while streaming
    def long_answer(route):
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", long_answer)
    cancelled = server.metric('idefics_request_success_total{finish_reason="cancelled"')
    page.click("#clear")
    page.fill("#max-tokens", "400")
    page.fill("#question", "Describe the image.")
    # Press stop from inside the page the moment the first text arrives: a click from the test process would race
    # the rest of the answer, which the tiny demo model streams in well under a second.
    page.evaluate(STOP_ON_FIRST_TEXT)
    page.click("#send")
    page.wait_for_function("window.stoppedWhileStreaming !== undefined")
    assert page.evaluate("window.stoppedWhileStreaming")  # the stop button was enabled: the answer was streaming
    page.wait_for_function("document.querySelector('#status').textContent === 'stopped'")
    answer = page.text_content(".turn.assistant .text")
    assert len(answer) > len(" [stopped]") and answer.endswith(" [stopped]") and page.is_disabled("#stop")
    server.wait_for(lambda: server.metric('idefics_request_success_total{finish_reason="cancelled"') == cancelled + 1,
                    what="the stopped request to be cancelled on the server")  # fmt: skip
    server.wait_for(lambda: server.metric("idefics_slots_used") == 0, what="its slot to be freed")
    assert errors == []
