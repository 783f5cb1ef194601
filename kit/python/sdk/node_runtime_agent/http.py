"""Outbound HTTP over `wasi:http` (the world's `outgoing-handler`), as a
small blocking client:

    response = http.post(url, json={"id": 7}, headers={"idempotency-key": key})
    if response.status >= 500: ...

The node lets a request through only to the hosts on the run's allow-list
(`run-agent --allow-http HOST`; on a node, the agent's allowed hosts). A
refused request raises `Denied`; a request that got no response raises
`HttpError`. Both are `AgentError`s: `Denied` is not retryable (the same
run would be refused again), a transport failure is. A response with any
status is returned, not raised: `raise_for_status()` turns a 4xx or 5xx
into an `HttpError` (5xx retryable)."""

import json as _json

from componentize_py_types import Err
from wit_world.imports import outgoing_handler as _handler
from wit_world.imports import streams as _streams
from wit_world.imports import wasi_http_types as _http

from .errors import AgentError

__all__ = ["Denied", "HttpError", "Response", "get", "post", "request"]

# Bytes of a response body read at most, unless a call says otherwise.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

# blocking-write-and-flush takes at most 4096 bytes at a time.
_WRITE_CHUNK = 4096

_METHODS = {
    "GET": _http.Method_Get,
    "HEAD": _http.Method_Head,
    "POST": _http.Method_Post,
    "PUT": _http.Method_Put,
    "DELETE": _http.Method_Delete,
    "OPTIONS": _http.Method_Options,
    "PATCH": _http.Method_Patch,
}


class HttpError(AgentError):
    """The request got no usable response. `url` is the request's URL,
    `code` the `wasi:http` error code's name (e.g. `ConnectionRefused`)
    or None, `status` the response status for `raise_for_status()`."""

    def __init__(self, message, url, code=None, status=None, retryable=True):
        super().__init__(message, retryable)
        self.url = url
        self.code = code
        self.status = status


class Denied(HttpError):
    """The node refused the request: its host is not on the run's
    allow-list (or the run has too many requests in flight). Not
    retryable."""


class Response:
    """`status` (int), `headers` (dict, lower-case names; repeated headers
    joined by `, `), `body` (bytes); `text()`, `json()`, `ok`."""

    def __init__(self, url, status, headers, body):
        self.url = url
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def ok(self):
        return 200 <= self.status < 300

    def text(self):
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        try:
            return _json.loads(self.body)
        except ValueError as err:
            raise HttpError(f"{self.url} answered {self.status} with a body that is not JSON ({err})", self.url,
                            status=self.status, retryable=False)

    def raise_for_status(self):
        """Raises `HttpError` for a 4xx (not retryable) or 5xx (retryable);
        returns the response otherwise."""
        if self.status >= 400:
            raise HttpError(f"{self.url} answered {self.status}", self.url, status=self.status,
                            retryable=self.status >= 500)
        return self


def _code_name(code):
    return type(code).__name__.removeprefix("ErrorCode_")


def _failure(url, authority, code):
    name = _code_name(code)
    if isinstance(code, _http.ErrorCode_HttpRequestDenied):
        # What an allow-list names, and what a message may show: the
        # authority without its user information (`user:pass@`).
        host = authority.rpartition("@")[2]
        scheme, _, rest = url.partition("://")
        shown = f"{scheme}://***@{host}{rest[len(authority):]}" if "@" in authority else url
        return Denied(
            f"the node denied the request to {host} ({shown}): the host is not on this run's allow-list "
            f"(run-agent: add --allow-http {host}; a node: add it to Sandbox.Grants.<agentId>.AllowedHosts), "
            f"or the run has too many requests in flight",
            url, name, retryable=False,
        )
    # A malformed request fails the same way every time; a connection, DNS
    # or protocol failure may pass later.
    retryable = not (name.startswith("HttpRequest") or name == "ConfigurationError")
    detail = getattr(code, "value", None)
    suffix = f": {detail}" if detail is not None else ""
    return HttpError(f"the request to {url} failed: {name}{suffix}", url, name, retryable=retryable)


def _split(url):
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise HttpError(f"{url!r} is not an http:// or https:// URL", url, retryable=False)
    at = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=-1)
    authority, path = (rest, "/") if at < 0 else (rest[:at], rest[at:])
    if path.startswith("?"):
        path = "/" + path
    if not authority:
        raise HttpError(f"{url!r} has no host", url, retryable=False)
    return (_http.Scheme_Http() if scheme == "http" else _http.Scheme_Https()), authority, path


def _error(url, authority, value):
    """An error raised while the request was being put together: an error
    code, or a header or field the request cannot carry (final)."""
    if isinstance(value, tuple(_http.ErrorCode.__args__)):
        return _failure(url, authority, value)
    return HttpError(f"the request to {url} cannot be sent: {value!r}", url, retryable=False)


def _write(outgoing_body, body):
    stream = outgoing_body.write()
    try:
        for start in range(0, len(body), _WRITE_CHUNK):
            stream.blocking_write_and_flush(body[start : start + _WRITE_CHUNK])
    finally:
        # The stream must be released before the body is finished.
        stream.__exit__(None, None, None)
    _http.OutgoingBody.finish(outgoing_body, None)


def request(method, url, *, headers=None, body=None, json=None, max_bytes=DEFAULT_MAX_BYTES):
    """Sends one request and reads the whole response. `body`: bytes or
    str; `json`: a value sent as JSON (with `content-type:
    application/json`). Raises `Denied`, `HttpError`."""
    scheme, authority, path = _split(url)
    fields = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
    if json is not None:
        body = _json.dumps(json, separators=(",", ":"))
        fields.setdefault("content-type", "application/json")
    if isinstance(body, str):
        body = body.encode()
    body = body or b""
    method_name = method.upper()
    method_case = _METHODS.get(method_name)
    try:
        outgoing = _http.OutgoingRequest(_http.Fields.from_list([(k, v.encode()) for k, v in fields.items()]))
        outgoing.set_method(method_case() if method_case else _http.Method_Other(method_name))
        outgoing.set_scheme(scheme)
        outgoing.set_authority(authority)
        outgoing.set_path_with_query(path)
        outgoing_body = outgoing.body()
        pending = _handler.handle(outgoing, None)
    except Err as err:
        raise _error(url, authority, err.value) from None
    try:
        _write(outgoing_body, body)
    except Err:
        # A request the node refuses (or a connection that fails) closes
        # the body's stream; the response future below says why.
        pass
    pending.subscribe().block()
    answer = pending.get()
    if answer is None or isinstance(answer, Err):
        raise HttpError(f"the request to {url} got no response", url)
    outcome = answer.value
    if isinstance(outcome, Err):
        raise _failure(url, authority, outcome.value)
    return _read(url, outcome.value, max_bytes)


def _read(url, incoming, max_bytes):
    status = incoming.status()
    headers = {}
    for name, value in incoming.headers().entries():
        text = value.decode("latin-1")
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    body = incoming.consume()
    stream = body.stream()
    chunks, size = [], 0
    try:
        while True:
            try:
                chunk = stream.blocking_read(65536)
            except Err as err:
                if isinstance(err.value, _streams.StreamError_Closed):
                    break
                raise HttpError(f"reading the response of {url} failed: {err.value!r}", url, status=status) from None
            size += len(chunk)
            if size > max_bytes:
                raise HttpError(f"the response of {url} is larger than {max_bytes} bytes (raise max_bytes)", url,
                                status=status, retryable=False)
            chunks.append(chunk)
    finally:
        stream.__exit__(None, None, None)
    _http.IncomingBody.finish(body)
    return Response(url, status, headers, b"".join(chunks))


def get(url, **kwargs):
    """`request("GET", url, ...)`."""
    return request("GET", url, **kwargs)


def post(url, **kwargs):
    """`request("POST", url, ...)`: `json=...` or `body=...`."""
    return request("POST", url, **kwargs)
