"""The web chat page in a real headless Chromium (Debian's chromium, driven by Playwright): it loads, sends a
message, the streamed answer appears, an image uploads and travels with the next message, the conversation survives
a reload (kept in the browser), and "new chat" clears it. Against a server with an API key, the page says the key is
missing, and chats once it is typed in.

Run: .venv/bin/python -m pytest tests/serve/test_web_page.py -v
"""

from __future__ import annotations

import shutil

import pytest

from tests.serve.server_process import ServerProcess, init_checkpoint
from tests.serve.test_server import IMAGE, client, media, server  # noqa: F401  (the module-scoped real server)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise RuntimeError("no chromium on PATH: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, server):  # noqa: F811
    pg = browser.new_page()
    pg.goto(server + "/")
    yield pg
    pg.close()


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


def test_the_page_asks_for_and_uses_the_api_key(browser, tmp_path_factory):
    ckpt = init_checkpoint(tmp_path_factory.mktemp("tiny-keyed"))
    with ServerProcess(ckpt, "--name", "keyed", "--api-key", "s3cret") as srv:
        base = srv.base
        pg = browser.new_page()
        pg.goto(base + "/")
        pg.wait_for_function("document.getElementById('model').textContent.includes('API key')")
        pg.fill("#max_tokens", "4")
        pg.fill("#text", "hello")
        pg.click("#send")
        pg.wait_for_selector(".msg.error")  # refused, and said so
        assert "API key" in pg.inner_text(".msg.error")
        pg.fill("#api_key", "s3cret")
        pg.dispatch_event("#api_key", "change")
        pg.wait_for_function("document.getElementById('model').textContent === 'keyed'")
        pg.fill("#text", "hello again")
        pg.click("#send")
        pg.wait_for_function("!document.getElementById('send').disabled")  # (disabled while the request runs)
        assert pg.locator(".msg.error").count() == 1  # only the first, keyless attempt failed
        assert pg.evaluate("document.querySelectorAll('.msg')[document.querySelectorAll('.msg').length - 1]"
                           ".className") == "msg assistant"
        assert pg.evaluate("sessionStorage.getItem('herd-api-key')") == "s3cret"
        assert pg.evaluate("localStorage.getItem('herd-api-key')") is None  # never kept beyond the tab
        pg.close()
