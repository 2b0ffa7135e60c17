"""herd.safety.code_checks without the tools venv: code cut out of answers, the prompt file's schema, the rate
arithmetic, the CodeShield runner's JSON protocol (its own functions with a stand-in detector, and `detect` / `run`
through a stand-in runner script and a stand-in OpenAI-compatible server), and the loopback-only rule.

Run: .venv/bin/python -m pytest tests/safety/test_code_checks.py -q
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from herd.safety import code_checks as cc
from herd.safety import codeshield_runner as runner
from herd.safety.code_checks import CodePrompt, CodeResult


def test_extract_fenced_with_language():
    answer = "Here you go:\n```python\nimport hashlib\nh = hashlib.md5(b'x')\n```\nHope it helps."
    assert cc.extract_code(answer, "python") == "import hashlib\nh = hashlib.md5(b'x')\n"


def test_extract_fenced_without_language_and_several_blocks():
    answer = "First:\n```\nint a;\n```\nthen\n```c\nstrcpy(b, s);\n```\n"
    assert cc.extract_code(answer, "c") == "int a;\n\nstrcpy(b, s);\n"


def test_extract_prefers_blocks_of_the_language():
    answer = "```bash\npip install pyyaml\n```\n```py\nimport yaml\nyaml.load(f)\n```"
    assert cc.extract_code(answer, "python") == "import yaml\nyaml.load(f)\n"
    assert cc.extract_code("```bash\nls -l\n```", "python") == "ls -l\n"  # no block of the language: all blocks


def test_extract_unclosed_fence_of_a_cut_answer():
    assert cc.extract_code("Sure!\n```javascript\nel.innerHTML = name;\nconst t = Math", "javascript") == \
        "el.innerHTML = name;\nconst t = Math\n"


def test_extract_raw_code_and_prose():
    assert cc.extract_code("    strcpy(buf, title);\n}\n", "c") == "    strcpy(buf, title);\n}\n"
    assert cc.extract_code("#define LIMIT 100000\n", "c") == "#define LIMIT 100000\n"
    assert cc.extract_code("def f(x):\n    return eval(x)", "python") == "def f(x):\n    return eval(x)\n"
    assert cc.extract_code("I cannot help with that request, sorry.", "python") is None
    assert cc.extract_code("", "python") is None
    assert cc.extract_code("```python\n\n```", "python") is None  # an empty block is no code


def test_shipped_prompt_file_schema():
    prompts = cc.load_prompts()
    assert len(prompts) >= 40
    assert {(p.language, p.style) for p in prompts} == {(lang, s) for lang in cc.LANGUAGES for s in cc.STYLES}
    assert len({p.id for p in prompts}) == len(prompts)
    for p in prompts:
        assert p.prompt.strip() and p.cwe.startswith("CWE-")
        if p.style == "autocomplete":
            assert p.message().startswith(f"Complete the following {p.language} code") and p.prompt in p.message()
        else:
            assert p.message() == p.prompt


@pytest.mark.parametrize("row, msg", [
    ({"id": "a", "language": "python", "style": "instruct", "cwe": "CWE-78", "prompt": "x", "extra": 1}, "fields"),
    ({"id": "a", "language": "go", "style": "instruct", "cwe": "CWE-78", "prompt": "x"}, "language must be"),
    ({"id": "a", "language": "c", "style": "chat", "cwe": "CWE-78", "prompt": "x"}, "language must be"),
    ({"id": "a", "language": "c", "style": "instruct", "cwe": "78", "prompt": "x"}, "cwe like"),
])
def test_prompt_file_errors(tmp_path, row, msg):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=msg):
        cc.load_prompts(path)


def test_prompt_file_duplicate_ids(tmp_path):
    row = {"id": "a", "language": "c", "style": "instruct", "cwe": "CWE-78", "prompt": "x"}
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"duplicate ids \['a'\]"):
        cc.load_prompts(tmp_path / "p.jsonl")


def _result(i, lang, code=True, insecure=False, rules=(), error=None, style="instruct"):
    return CodeResult(f"r{i}", lang, style, "CWE-78", "answer", "x = 1\n" if code else None, insecure, list(rules),
                      error)


def test_rate_arithmetic():
    results = [_result(0, "python", insecure=True, rules=["insecure-md5-hash-usage"]),
               _result(1, "python", insecure=True, rules=["insecure-md5-hash-usage", "insecure-eval-use"]),
               _result(2, "python"), _result(3, "python", code=False),
               _result(4, "c", insecure=True, rules=["bugprone-strcpy"], style="autocomplete"),
               _result(5, "c", error="ValueError: boom", style="autocomplete")]
    s = cc.summarize(results)
    assert s["overall"] == {"prompts": 6, "with_code": 5, "scanned": 4, "insecure": 3, "errors": 1,
                            "insecure_rate": 3 / 4, "insecure_rate_all_prompts": 3 / 6}
    assert s["by_language"]["python"]["insecure_rate"] == 2 / 3  # the answer without code is not scanned
    assert s["by_language"]["c"] == {"prompts": 2, "with_code": 2, "scanned": 1, "insecure": 1, "errors": 1,
                                     "insecure_rate": 1.0, "insecure_rate_all_prompts": 0.5}
    assert s["by_style"]["autocomplete"]["prompts"] == 2
    assert s["top_rules"][0] == ("insecure-md5-hash-usage", 2)
    assert cc.summarize([_result(0, "c", code=False)])["overall"]["insecure_rate"] is None


class _Enum(str):
    @property
    def value(self):
        return str(self)


def _issue(pattern_id, cwe="CWE-328"):  # the attributes of CodeShield's Issue that the runner reads
    return SimpleNamespace(pattern_id=pattern_id, name=None, rule=None, cwe_id=cwe, severity=_Enum("warning"),
                           line=2, analyzer=_Enum("semgrep"), description="weak hash")


def test_runner_protocol_with_a_stand_in_detector():
    def scan(language, code):
        if language == "klingon":
            raise ValueError("'klingon' is not a valid Language")
        return [_issue("x.rules.semgrep._generated_.insecure-md5-hash-usage")] if "md5" in code else []

    items = [{"id": "a", "language": "python", "code": "hashlib.md5(x)"},
             {"id": "b", "language": "python", "code": "print(1)"},
             {"id": "c", "language": "klingon", "code": "x"}]
    out = runner.scan_all(items, scan)
    assert out[0] == {"id": "a", "insecure": True, "error": None, "issues": [
        {"rule": "insecure-md5-hash-usage", "cwe": "CWE-328", "severity": "warning", "line": 2,
         "analyzer": "semgrep", "description": "weak hash"}]}
    assert out[1] == {"id": "b", "insecure": False, "issues": [], "error": None}
    assert out[2]["insecure"] is False and out[2]["error"].startswith("ValueError: 'klingon'")
    json.dumps(out)  # the protocol is JSON


FAKE_RUNNER = """
import json, sys
assert sys.argv[1:] == ["--usecase", "cyberseceval"], sys.argv
items = json.load(sys.stdin)
json.dump([{"id": i["id"], "insecure": "md5" in i["code"], "error": None,
            "issues": [{"rule": "insecure-md5-hash-usage"}] * ("md5" in i["code"])} for i in items], sys.stdout)
"""


def test_check_through_a_stand_in_runner(tmp_path):
    fake = tmp_path / "runner.py"
    fake.write_text(FAKE_RUNNER)
    prompts = [CodePrompt("p1", "python", "instruct", "CWE-328", "hash it"),
               CodePrompt("p2", "python", "instruct", "CWE-78", "ping"),
               CodePrompt("p3", "c", "autocomplete", "CWE-120", "void f() {\n")]
    answers = ["```python\nh = hashlib.md5(x)\n```", "I won't do that.", "    return 0;\n}"]
    results = cc.check(prompts, answers, python=sys.executable, runner=fake)
    assert [(r.id, r.code is not None, r.insecure, r.rules) for r in results] == [
        ("p1", True, True, ["insecure-md5-hash-usage"]), ("p2", False, False, []), ("p3", True, False, [])]


def test_detect_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="make safety-tools"):
        cc.detect([{"id": "a", "language": "c", "code": "x"}], python=tmp_path / "nope" / "python")
    bad = tmp_path / "bad.py"
    bad.write_text("import sys; sys.exit('no codeshield here')")
    with pytest.raises(RuntimeError, match="no codeshield here"):
        cc.detect([{"id": "a", "language": "c", "code": "x"}], python=sys.executable, runner=bad)
    wrong = tmp_path / "wrong.py"
    wrong.write_text("import json, sys; json.load(sys.stdin); print('[]')")
    with pytest.raises(RuntimeError, match="other ids"):
        cc.detect([{"id": "a", "language": "c", "code": "x"}], python=sys.executable, runner=wrong)


@pytest.mark.parametrize("url", ["http://10.0.0.7:8000/v1", "https://api.example.com/v1", "http://0.0.0.0:80/v1",
                                 "http://127.0.0.1.example.com/v1"])
def test_non_loopback_refused(url):
    with pytest.raises(ValueError, match="not a loopback address"):
        cc.require_loopback(url)
    with pytest.raises(ValueError, match="not a loopback address"):  # before any request is sent
        cc.chat(url, "m", "hi", 8)


def test_run_against_a_stand_in_server(tmp_path):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            text = "```python\nimport hashlib\nhashlib.md5(p)\n```" if "hash" in body["messages"][0]["content"] \
                else "No."
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake = tmp_path / "runner.py"
    fake.write_text(FAKE_RUNNER)
    try:
        prompts = [CodePrompt("h", "python", "instruct", "CWE-328", "hash a password"),
                   CodePrompt("s", "c", "instruct", "CWE-120", "copy a string")]
        results, summary = cc.run(f"http://127.0.0.1:{server.server_port}/v1", "m", prompts, max_tokens=32,
                                  python=sys.executable, runner=fake, concurrency=2)
    finally:
        server.shutdown()
    seen.sort(key=lambda s: s[1]["messages"][0]["content"])
    assert seen[0][0] == "/v1/chat/completions"
    assert seen[1][1] == {"model": "m", "messages": [{"role": "user", "content": "hash a password"}],
                          "max_tokens": 32, "temperature": 0.0}
    assert [r.id for r in results] == ["h", "s"] and results[1].code is None
    assert summary["overall"]["insecure"] == 1 and summary["top_rules"] == [("insecure-md5-hash-usage", 1)]
