"""The chat page in headless Debian Chromium (Playwright): pick an image, ask, and the answer streams in."""

from __future__ import annotations

import os

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (`make browser`) to run the chat-page test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_upload_ask_and_the_answer_streams_in(browser, chat_app, tmp_path):
    image_path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 20, 20)).save(image_path)
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
    try:
        page.goto(chat_app + "/")
        page.wait_for_selector("#model:has-text('vitune-tiny')", timeout=30_000)
        page.set_input_files("#image", str(image_path))
        page.wait_for_selector("#preview[src^='data:image/png;base64,']", state="visible")
        page.fill("#question", "What colour is the square?")
        page.click("details summary")  # the settings
        page.fill("#max_tokens", "24")
        # count the answer's renders: a streamed answer is drawn delta by delta, not once at the end
        page.evaluate("""() => {
            window.renders = [];
            new MutationObserver((records) => {
                for (const r of records) {
                    const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
                    if (el && el.classList.contains("assistant")) window.renders.push(el.textContent);
                }
            }).observe(document.getElementById("log"), {childList: true, subtree: true, characterData: true});
        }""")
        page.click("#send")
        answer = page.wait_for_selector(".assistant[data-state='done']", timeout=120_000)
        text = answer.inner_text()
        user_turn = page.inner_text(".turn.user")
        renders = page.evaluate("window.renders")
    finally:
        page.close()
    assert text.startswith("Assistant: ") and len(text) > len("Assistant: "), text
    assert "What colour is the square?" in user_turn
    partial = {r for r in renders if r.startswith("Assistant: ") and len(r) > len("Assistant: ")}
    assert len(partial) >= 2, renders  # the text grew in steps
    assert any(r.startswith("POST ") and r.endswith("/v1/chat/completions") for r in requests), requests
