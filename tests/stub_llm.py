"""A loopback stub of an OpenAI-compatible chat endpoint that injects scripted faults (tests only).

Answers are deterministic tags made from the item's title words, so tests can check what came back.
`faults` maps a title substring to a list of behaviours consumed one per request for that title
(`default` is the behaviour of every other request):
ok, http_<status> (e.g. http_429, http_503), timeout, malformed, empty, truncated, no_tags,
drop (close the connection), garbage (HTTP 200 with an HTML body), not_completion (HTTP 200 with a JSON
body that is not a chat completion), huge (a valid answer of about 80 KB), not_utf8 (a chat completion
whose body holds bytes that are not UTF-8), surrogate (a chat completion whose answer escapes a lone
surrogate, text no UTF-8 can hold), hang (no answer until the stub closes), or a dict
{"status": 429, "headers": {"Retry-After": "5"}, "body": "..."} for any status, response headers and
body (by default a JSON error; str, bytes, or an object sent as JSON).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def title_tags(prompt: str) -> list[str]:
    listed = re.findall(r"\nList: (.*)", prompt)
    if listed:  # pass 2: tags chosen from the list given
        return listed[-1].split(", ")[:3]
    match = re.findall(r"title: (.*)", prompt)
    words = re.findall(r"[a-z]+", (match[-1] if match else "").lower())
    return [w for w in words if len(w) > 2][:5] or ["misc"]


HUGE_CHARS = 80_000
GARBAGE = b"<html>oops</html>"


class StubLLM:
    def __init__(self, faults: dict[str, list] | None = None, delay: float = 0.0, default: str | dict = "ok"):
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.delay = delay
        self.default = default
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()  # ends the requests that hang
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                body = json.dumps({"status": "ok"} if self.path == "/health" else {"data": [{"id": "stub"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = request["messages"][-1]["content"]
                with stub.lock:
                    stub.requests.append(request)
                    stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    behaviour = stub.default
                    for needle, queue in stub.faults.items():
                        if needle in prompt and queue:
                            behaviour = queue.pop(0)
                            break
                if stub.delay:
                    time.sleep(stub.delay)
                if behaviour == "drop":
                    self.connection.close()
                    return
                if behaviour == "timeout":
                    time.sleep(3)
                if behaviour == "hang":
                    stub.closing.wait(600)
                    self.connection.close()
                    return
                if isinstance(behaviour, dict):
                    body = behaviour.get("body", {"error": {"message": f"http_{behaviour['status']}"}})
                    return self.reply(behaviour["status"], body.encode() if isinstance(body, str) else body,
                                      behaviour.get("headers", {}))
                if behaviour.startswith("http_"):
                    return self.reply(int(behaviour[5:]), {"error": {"message": behaviour}})
                if behaviour == "garbage":
                    return self.reply(200, GARBAGE, {"Content-Type": "text/html"})
                if behaviour == "not_completion":
                    return self.reply(200, {"hello": "world"})
                if behaviour in ("not_utf8", "surrogate"):
                    completion = {"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "@ANSWER@"},
                                               "finish_reason": "stop"}]}
                    answer = b'[\\"caf\xe9\xff\\"]' if behaviour == "not_utf8" else b'[\\"caf\\ud800\\"]'
                    return self.reply(200, json.dumps(completion).encode().replace(b"@ANSWER@", answer))
                content = {
                    # a request under a grammar (tagging's "list" answer form) is answered as a comma-separated line
                    "ok": ", ".join(title_tags(prompt)) if "grammar" in request else json.dumps({"tags": title_tags(prompt)}),
                    "timeout": json.dumps({"tags": title_tags(prompt)}),
                    "malformed": '{"tags": ["half',
                    "empty": "",
                    "truncated": '{"tags": ["a", "b"',
                    "no_tags": json.dumps({"labels": 3}),
                    "huge": json.dumps({"tags": title_tags(prompt), "notes": "x" * HUGE_CHARS}),
                }[behaviour]
                finish = "length" if behaviour == "truncated" else "stop"
                self.reply(200, {
                    "id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": max(1, len(content) // 4),
                              "total_tokens": len(prompt) // 4 + len(content) // 4},
                })

            def reply(self, status, payload, headers=None):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
