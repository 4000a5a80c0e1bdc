"""A local model behind the OpenAI chat-completions API (`sublearn serve`).

Standard library only (`http.server`) on top of `HFBackend`, so the OpenAI backend, the
fine-tuning tooling and external OpenAI-client code can be tested against a real model without
network or GPU. Supports `messages`, `temperature`, `top_p`, `max_tokens` (or
`max_completion_tokens`), `n`, `seed`, and vLLM-style guided decoding in the request body:
`guided_grammar` (vLLM < 0.12) or `structured_outputs: {"grammar": ...}` (vLLM >= 0.10.2).

Generation is serialised by a lock: one model serves every request, and on CPU one batch at a
time is as fast as interleaving. Requests with `n > 1` are one batch.
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sublearn.backends.base import Backend, ChatRequest, SamplingParams

MAX_N = 128  # more completions per request than this is almost certainly a client bug
DEFAULT_MAX_TOKENS = 256


class RequestError(Exception):
    """A client error, answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class Conversation(ChatRequest):
    """Any OpenAI message list (multi-turn included); HFBackend only calls `messages()`."""

    turns: tuple[tuple[str, str], ...] = ()

    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.turns]


@dataclass
class ServerStats:
    """Counters the tests read to prove retries and cache hits."""

    chat_requests: int = 0  # POST /v1/chat/completions received, failures included
    injected_failures: int = 0
    completions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content) and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise RequestError(400, "message content must be a string or a list of text parts")


def parse_request(body: dict[str, Any]) -> tuple[Conversation, SamplingParams, int, int | None]:
    """OpenAI request body -> (conversation, sampling params, n, seed); raises RequestError."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list")
    turns = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                            "assistant"):
            raise RequestError(400, "each message needs a role: system, user or assistant")
        role = "system" if m["role"] == "developer" else m["role"]
        turns.append((role, _content_text(m.get("content"))))
    if turns[-1][0] != "user":
        raise RequestError(400, "the last message must come from the user")

    def number(name: str, default: Any, kind: type, lo: float, hi: float) -> Any:
        v = body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and v != int(v)):
            raise RequestError(400, f"'{name}' must be a number")
        if not lo <= v <= hi:
            raise RequestError(400, f"'{name}' must be in [{lo}, {hi}], got {v}")
        return kind(v)

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    body = {**body, "max_tokens": max_tokens}
    grammar = body.get("guided_grammar")
    so = body.get("structured_outputs")
    if isinstance(so, dict) and so.get("grammar") is not None:
        grammar = so["grammar"]
    if grammar is not None and (not isinstance(grammar, str) or not grammar.strip()):
        raise RequestError(400, "'guided_grammar' must be a non-empty EBNF string")
    params = SamplingParams(
        temperature=number("temperature", 1.0, float, 0.0, 2.0),  # 0: greedy, as in the API
        top_p=number("top_p", 1.0, float, 1e-6, 1.0),
        max_new_tokens=number("max_tokens", DEFAULT_MAX_TOKENS, int, 1, 32768),
        grammar=grammar,
    )
    n = number("n", 1, int, 1, MAX_N)
    seed = number("seed", None, int, -(2**63), 2**63 - 1)
    return Conversation(user=turns[-1][1], turns=tuple(turns)), params, n, seed


class ChatServer:
    """OpenAI-compatible server around one backend; `start()` serves from a daemon thread."""

    def __init__(self, backend: Backend, model_name: str | None = None, host: str = "127.0.0.1",
                 port: int = 0, fail_every: int = 0) -> None:
        self.backend = backend
        self.model_name = model_name or backend.model_id
        self.fail_every = fail_every
        self.stats = ServerStats()
        self._generate_lock = threading.Lock()
        self._seeds = itertools.count(int.from_bytes(secrets.token_bytes(4), "big"))
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}/v1"

    def start(self) -> ChatServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- request logic (no HTTP here, so it is easy to read and test) --

    def injected_failure(self) -> int | None:
        """Every `fail_every`-th chat request fails: 429 and 500 alternately."""
        with self.stats.lock:
            self.stats.chat_requests += 1
            if self.fail_every <= 0 or self.stats.chat_requests % self.fail_every:
                return None
            self.stats.injected_failures += 1
            return 429 if self.stats.injected_failures % 2 else 500

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": 0, "owned_by": "sublearn"}]}

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("stream"):
            raise RequestError(400, "streaming is not supported by sublearn serve")
        if body.get("model") != self.model_name:
            raise RequestError(404, f"model '{body.get('model')}' does not exist; this server "
                               f"serves '{self.model_name}'", "not_found_error")
        conv, params, n, seed = parse_request(body)
        if seed is None:
            seed = next(self._seeds)
        with self._generate_lock:
            try:
                results = self.backend.generate([conv] * n, params, seed)
            except (RuntimeError, ValueError) as e:  # e.g. a grammar xgrammar cannot compile
                raise RequestError(400, f"generation failed: {e}") from None
            prompt_tokens = self._prompt_tokens(conv)
        with self.stats.lock:
            self.stats.completions += n
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": r.text},
                 "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": sum(r.n_tokens for r in results),
                "total_tokens": prompt_tokens + sum(r.n_tokens for r in results),
            },
        }

    def _prompt_tokens(self, conv: Conversation) -> int:
        texts = getattr(self.backend, "prompt_texts", None)
        tok = getattr(self.backend, "tok", None)
        if texts is None or tok is None:
            return 0
        return len(tok(texts([conv])[0], add_special_tokens=False)["input_ids"])

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the OpenAI client expects

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the client reports its own errors

            def _send(self, status: int, obj: dict[str, Any],
                      headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, kind: str,
                       headers: dict[str, str] | None = None) -> None:
                self._send(status, {"error": {"message": message, "type": kind, "param": None,
                                              "code": None}}, headers)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, server.models())
                else:
                    self._error(404, f"no route GET {self.path}", "not_found_error")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._error(404, f"no route POST {self.path}", "not_found_error")
                    return
                failure = server.injected_failure()
                # Retry-After-Ms keeps a test's retries quick (clients back off ~1 s otherwise).
                if failure == 429:
                    self._error(429, "injected rate limit (--fail-every)", "rate_limit_error",
                                {"Retry-After-Ms": "10"})
                    return
                if failure == 500:
                    self._error(500, "injected server error (--fail-every)", "server_error",
                                {"Retry-After-Ms": "10"})
                    return
                try:
                    body = json.loads(raw or b"null")
                    if not isinstance(body, dict):
                        raise RequestError(400, "request body must be a JSON object")
                    self._send(200, server.chat(body))
                except json.JSONDecodeError:
                    self._error(400, "request body is not valid JSON", "invalid_request_error")
                except RequestError as e:
                    self._error(e.status, str(e), e.kind)
                except Exception as e:  # a bug must not kill the server thread silently
                    self._error(500, f"{type(e).__name__}: {e}", "server_error")

        return Handler


def make_server(model: str | None = None, host: str = "127.0.0.1", port: int = 0,
                fail_every: int = 0, served_model_name: str | None = None,
                dtype: str = "auto", batch_size: int = 64) -> ChatServer:
    """Load `model` (embedded default) with HFBackend and bind a server (not started)."""
    from sublearn.backends.hf import HFBackend

    backend = HFBackend(model, dtype=dtype, batch_size=batch_size)
    return ChatServer(backend, served_model_name, host=host, port=port, fail_every=fail_every)
