"""The web chat page in a real headless Chromium (Debian's chromium, driven by Playwright): it loads, sends a
message, the streamed answer appears, an image uploads and travels with the next message, the conversation survives
a reload (kept in the browser), and "new chat" clears it.

Run: .venv/bin/python -m pytest tests/serve/test_web_page.py -v
"""

from __future__ import annotations

import shutil

import pytest

from tests.serve.test_server import IMAGE, client, server  # noqa: F401  (the module-scoped real server fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(server):  # noqa: F811
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise RuntimeError("no chromium on PATH: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page()
        pg.goto(server + "/")
        yield pg
        browser.close()


def test_the_page_chats_streams_uploads_and_remembers(page, client):  # noqa: F811
    # a prompt whose greedy answer from this random model has visible text (many tiny-tokenizer ids are special)
    prompt, expected = next((p, a) for p in (f"Hello number {i}, who are you?" for i in range(50))
                            if (a := client.chat.completions.create(
                                model="tiny", messages=[{"role": "user", "content": p}], max_tokens=12,
                                temperature=0).choices[0].message.content).strip())
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    page.fill("#max_tokens", "12")
    page.fill("#temperature", "0")
    page.fill("#text", prompt)
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1 && "
                           "!document.getElementById('send').disabled")
    assert page.inner_text(".msg.user") == prompt
    assert page.evaluate("document.querySelector('.msg.assistant span').textContent") == expected  # as streamed
    page.set_input_files("#file", str(IMAGE))
    page.wait_for_function("document.getElementById('pending').textContent.startsWith('image:')")
    page.fill("#text", "What is in this picture?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                           "!document.getElementById('send').disabled")
    assert page.locator(".msg.user img").count() == 1  # the uploaded image is shown with the message
    stored = page.evaluate("JSON.parse(localStorage.getItem('herd-chat'))")
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[2]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    page.reload()
    page.wait_for_function("document.querySelectorAll('.msg').length === 4")  # kept in the browser
    page.click("#reset")
    assert page.locator(".msg").count() == 0
