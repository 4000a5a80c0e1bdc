"""OpenAI-compatible chat backend (`openai:<model>`): OpenAI, vLLM servers, `sublearn serve`.

Each request is one API call with n=1 and seed `seed + index`, sent from a thread pool. Calls
that fail with 408, 409, 429, 5xx or a connection error are retried by the openai client itself
(`max_retries`: exponential backoff with jitter, honouring Retry-After); a request that still
fails becomes `Completion(finish_reason="error")`, so one bad answer never loses a batch.
Successful answers go to an append-only JSONL cache keyed by a hash of everything that
determines them, so a rerun after an interruption does not pay for them twice.

Endpoint and key come from options or OPENAI_BASE_URL / OPENAI_API_KEY. They are kept only
inside the client: `model_id` (recorded in raw.jsonl) is `openai:<model>`, and the cache holds
hashes, never URLs or keys. Other options may also be set as SUBLEARN_OPENAI_<NAME> variables
(e.g. SUBLEARN_OPENAI_GUIDED=guided_grammar), since stages build backends from a model id alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sublearn.backends.base import ChatRequest, Completion, SamplingParams
from sublearn.errors import MissingExtraError, SublearnError
from sublearn.files import parse_jsonl

# How the grammar is sent when guided decoding is on (vLLM removed guided_* in v0.12).
GUIDED_FIELDS = ("guided_grammar", "structured_outputs")
RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx
# Options of local engines that stages pass to every backend; meaningless for an API.
IGNORED_OPTIONS = frozenset({"dtype", "batch_size"})


@dataclass(frozen=True)
class OpenAIOptions:
    base_url: str | None = None  # default: OPENAI_BASE_URL, else api.openai.com
    api_key: str | None = field(default=None, repr=False)  # default: OPENAI_API_KEY
    concurrency: int = 8  # requests in flight at once
    max_retries: int = 6  # the client's retries per request after the first try
    timeout: float = 120.0  # seconds per HTTP request
    guided: bool | str = False  # send params.grammar: True/"guided_grammar"/"structured_outputs"
    cache: str | Path | bool | None = None  # JSONL; None/True: <cache>/openai/responses.jsonl

    @classmethod
    def build(cls, options: dict[str, Any]) -> OpenAIOptions:
        """Options from keyword arguments over SUBLEARN_OPENAI_* variables over defaults."""
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            env = os.environ.get(f"SUBLEARN_OPENAI_{f.name.upper()}")
            if env is not None and f.name not in ("base_url", "api_key"):
                kw[f.name] = _parse_env(f.name, env)
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)} - IGNORED_OPTIONS
        if unknown:
            raise SublearnError(f"unknown option(s) for the openai backend: {sorted(unknown)}")
        kw.update({k: v for k, v in options.items() if k not in IGNORED_OPTIONS})
        opts = cls(**kw)
        if opts.guided is True:
            opts = dataclasses.replace(opts, guided="guided_grammar")
        if opts.guided not in (False, *GUIDED_FIELDS):
            raise SublearnError(f"guided must be false or one of {GUIDED_FIELDS}: {opts.guided}")
        if opts.concurrency < 1 or opts.max_retries < 0:
            raise SublearnError("concurrency must be >= 1 and max_retries >= 0")
        return opts


def _parse_env(name: str, value: str) -> Any:
    if name in ("concurrency", "max_retries"):
        return int(value)
    if name == "timeout":
        return float(value)
    low = value.strip().lower()
    if low in ("", "0", "false", "no", "off"):
        return False
    if name == "guided" and low in ("1", "true", "yes", "on"):
        return True
    return value


class ResponseCache:
    """Append-only JSONL of {"key", "text", "n_tokens", "finish_reason"}; thread-safe.

    Several processes (a sweep) may append to one file: each row is one small write to a file
    opened in append mode, and unreadable lines (a torn write) are skipped, not repaired, so a
    reader never truncates what another process is writing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            for row in parse_jsonl(data.decode("utf-8", "replace"), path, skip_bad=True):
                if isinstance(row, dict) and isinstance(row.get("key"), str):
                    self._rows[row["key"]] = row
            if data and not data.endswith(b"\n"):  # start our rows on a fresh line
                with open(path, "ab") as f:
                    f.write(b"\n")

    def get(self, key: str) -> Completion | None:
        row = self._rows.get(key)
        if row is None:
            return None
        return Completion(row["text"], row["n_tokens"], row["finish_reason"])

    def put(self, key: str, c: Completion) -> None:
        row = {"key": key, "text": c.text, "n_tokens": c.n_tokens,
               "finish_reason": c.finish_reason}
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self._rows[key] = row
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())


def make_client(base_url: str | None = None, api_key: str | None = None, max_retries: int = 0,
                timeout: float = 120.0) -> Any:
    """An `openai.OpenAI` client; endpoint and key default to OPENAI_BASE_URL / OPENAI_API_KEY."""
    try:
        import openai
    except ModuleNotFoundError:
        raise MissingExtraError("openai", "openai") from None
    base_url = base_url or os.environ.get("OPENAI_BASE_URL")
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key and base_url:
        api_key = "EMPTY"  # local servers (vLLM, sublearn serve) accept any key
    if not api_key:
        raise SublearnError("the OpenAI API needs OPENAI_API_KEY (or OPENAI_BASE_URL for a "
                            "local server)")
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries,
                         timeout=timeout)


def default_cache_path() -> Path:
    from sublearn.models.embedded import cache_root

    return cache_root() / "openai" / "responses.jsonl"


def _endpoint_id(url: str | None) -> str:
    """The server a response came from, for the cache key: without credentials or query."""
    if not url:
        return "default"
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}:{u.port}{u.path.rstrip('/')}"


class OpenAIBackend:
    def __init__(self, model: str | None, client: Any = None, **options: Any) -> None:
        if not model:
            raise SublearnError("the openai backend needs a model name: openai:<model>")
        try:
            import openai
        except ModuleNotFoundError:
            raise MissingExtraError("openai", "openai") from None
        self._openai = openai
        self.opts = OpenAIOptions.build(options)
        self.model = model
        self.model_id = f"openai:{model}"  # recorded in run folders: never a URL or a key
        # Whether params.grammar constrains sampling (else only the downstream filter applies).
        self.enforces_grammar = bool(self.opts.guided)
        self._endpoint = _endpoint_id(self.opts.base_url or os.environ.get("OPENAI_BASE_URL"))
        if client is None:
            client = make_client(self.opts.base_url, self.opts.api_key,
                                 max_retries=self.opts.max_retries, timeout=self.opts.timeout)
        self.opts = dataclasses.replace(self.opts, api_key=None)  # don't keep the key around
        self.client = client
        cache = self.opts.cache
        self.cache = None if cache is False else ResponseCache(
            Path(cache) if isinstance(cache, str | os.PathLike) else default_cache_path())

    def generate(self, requests: list[ChatRequest], params: SamplingParams,
                 seed: int) -> list[Completion]:
        out: list[Completion | None] = [None] * len(requests)
        todo: list[tuple[int, str]] = []
        for i, r in enumerate(requests):
            key = self._key(r, params, seed, i)
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                out[i] = hit
            else:
                todo.append((i, key))
        if todo:
            pool = ThreadPoolExecutor(min(self.opts.concurrency, len(todo)))
            try:
                futures = [pool.submit(self._fetch, requests[i], params, seed + i, key)
                           for i, key in todo]
                for (i, _), fut in zip(todo, futures, strict=True):
                    out[i] = fut.result()
            finally:  # on Ctrl-C, don't wait for the queued requests
                pool.shutdown(wait=False, cancel_futures=True)
        return [c for c in out if c is not None]

    def _fetch(self, r: ChatRequest, params: SamplingParams, seed: int, key: str) -> Completion:
        c = self._call(r, params, seed)
        if self.cache and c.finish_reason != "error":
            self.cache.put(key, c)  # at once: an interrupted batch keeps what it paid for
        return c

    def _key(self, r: ChatRequest, params: SamplingParams, seed: int, index: int) -> str:
        blob = json.dumps({
            "endpoint": self._endpoint, "model": self.model, "messages": r.messages(),
            "params": dataclasses.asdict(params), "guided": self.opts.guided,
            "seed": seed, "index": index,
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _request_kwargs(self, r: ChatRequest, params: SamplingParams, seed: int) -> dict:
        kw: dict[str, Any] = {
            "model": self.model, "messages": r.messages(), "temperature": params.temperature,
            "top_p": params.top_p, "max_tokens": params.max_new_tokens, "n": 1, "seed": seed,
        }
        # Without guided decoding the grammar is not sent: the strict filter downstream
        # rejects answers outside it.
        if params.grammar and self.opts.guided == "guided_grammar":
            kw["extra_body"] = {"guided_grammar": params.grammar}
        elif params.grammar and self.opts.guided == "structured_outputs":
            kw["extra_body"] = {"structured_outputs": {"grammar": params.grammar}}
        return kw

    def _call(self, r: ChatRequest, params: SamplingParams, seed: int) -> Completion:
        openai = self._openai
        try:
            resp = self.client.chat.completions.create(**self._request_kwargs(r, params, seed))
            choice = resp.choices[0]
            n_tokens = resp.usage.completion_tokens if resp.usage else 0
            return Completion(choice.message.content or "", n_tokens,
                              choice.finish_reason or "stop")
        except openai.APIStatusError as e:
            error = f"HTTP {e.status_code}: {_error_message(e)}"
            retried = e.status_code in RETRY_STATUS or e.status_code >= 500
        except openai.APIConnectionError as e:  # includes timeouts
            error, retried = f"{type(e).__name__}: {e}", True
        except Exception as e:  # an unparseable answer: report it, don't kill the batch
            error, retried = f"{type(e).__name__}: {e}", False
        tries = getattr(self.client, "max_retries", self.opts.max_retries) + 1 if retried else 1
        return Completion("", 0, "error", error=f"{error} (after {tries} tries)")


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        msg = body.get("message") or (body.get("error") or {}).get("message")
        if msg:
            return str(msg)[:300]
    return str(e)[:300]
