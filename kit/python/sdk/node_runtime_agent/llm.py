"""Chat completion through the node (the world's `llm` interface), with
tools and structured output.

    reply = llm.chat([llm.system("You classify invoices."), llm.user(text)],
                     response_format=llm.json_schema("invoice", SCHEMA))
    data = reply.json()

The node holds the provider and its key and meters every call against the
run's token budget. A refused or failed call raises `LlmError`, an
`AgentError` whose `retryable` says whether a later run could succeed
(a provider outage or timeout: yes; no endpoint, budget spent, a malformed
request: no) and whose `kind` names the world's case."""

import json

from componentize_py_types import Err
from wit_world.imports import llm as _llm

from .errors import AgentError

__all__ = [
    "LlmError",
    "Reply",
    "Tool",
    "ToolCall",
    "assistant",
    "chat",
    "json_object",
    "json_schema",
    "system",
    "tool_result",
    "user",
]

_ROLES = {
    "system": _llm.Role.SYSTEM,
    "user": _llm.Role.USER,
    "assistant": _llm.Role.ASSISTANT,
    "tool": _llm.Role.TOOL,
}

# The world's error cases: (kind, retryable).
_ERRORS = {
    _llm.LlmError_NotConfigured: ("not-configured", False),
    _llm.LlmError_BudgetExhausted: ("budget-exhausted", False),
    _llm.LlmError_Timeout: ("timeout", True),
    _llm.LlmError_Provider: ("provider", True),
    _llm.LlmError_InvalidRequest: ("invalid-request", False),
}


class LlmError(AgentError):
    """`llm.chat` failed. `kind` is the world's case (`not-configured`,
    `budget-exhausted`, `timeout`, `provider`, `invalid-request`),
    `detail` the node's message."""

    def __init__(self, kind, detail, retryable):
        super().__init__(f"the LLM call failed ({kind}): {detail}", retryable)
        self.kind = kind
        self.detail = detail


class ToolCall:
    """A call the model asked for. `arguments` is the model's JSON text:
    `args()` parses it (check the values before use)."""

    def __init__(self, id, name, arguments):
        self.id = id
        self.name = name
        self.arguments = arguments

    def args(self):
        """The arguments, parsed; a model that wrote no JSON raises
        `AgentError` (not retryable)."""
        try:
            return json.loads(self.arguments or "{}")
        except ValueError as err:
            raise AgentError(f"the model's arguments for tool {self.name!r} are not JSON ({err}): {self.arguments[:200]}")

    def __repr__(self):
        return f"ToolCall(id={self.id!r}, name={self.name!r}, arguments={self.arguments!r})"


class Tool:
    """A tool the model may ask to call. `parameters` is the JSON Schema of
    its arguments, a dict (or JSON text). The node never calls it: the
    agent does, and answers with `tool_result(call.id, ...)`."""

    def __init__(self, name, description, parameters=None):
        self.name = name
        self.description = description
        self.parameters = parameters if parameters is not None else {"type": "object", "properties": {}}

    def _raw(self):
        parameters = self.parameters if isinstance(self.parameters, str) else json.dumps(self.parameters)
        return _llm.Tool(name=self.name, description=self.description, parameters=parameters)


def _message(role, content, tool_calls=(), tool_call_id=None):
    return _llm.Message(
        role=_ROLES[role],
        content=str(content),
        tool_calls=[_llm.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in tool_calls],
        tool_call_id=tool_call_id,
    )


def system(content):
    """A system message."""
    return _message("system", content)


def user(content):
    """A user message."""
    return _message("user", content)


def assistant(content, tool_calls=()):
    """The model's turn, as it answered (`reply.message()` builds it)."""
    return _message("assistant", content, tool_calls)


def tool_result(call_id, content):
    """A tool's result, answering the model's call `call_id`; a dict or list
    is sent as JSON."""
    if not isinstance(content, str):
        content = json.dumps(content)
    return _message("tool", content, tool_call_id=call_id)


def json_object():
    """`response_format`: a JSON object, any shape."""
    return _llm.ResponseFormat_JsonObject()


def json_schema(name, schema, strict=True):
    """`response_format`: JSON matching `schema` (a dict or JSON text).
    `strict` asks the provider to follow it exactly (every property
    required, no others)."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return _llm.ResponseFormat_JsonSchema(_llm.JsonSchema(name=name, schema=text, strict=strict))


class Reply:
    """The model's answer: `content` (text), `tool_calls` (empty when it
    answered), `model`, `tokens_in`, `tokens_out`, `finish_reason`."""

    def __init__(self, raw):
        self.content = raw.content
        self.tool_calls = [ToolCall(c.id, c.name, c.arguments) for c in raw.tool_calls]
        self.model = raw.model
        self.tokens_in = raw.usage.tokens_in
        self.tokens_out = raw.usage.tokens_out
        self.finish_reason = raw.finish_reason

    def message(self):
        """This answer as the `assistant` message of the next request (with
        its tool calls, as the model gave them)."""
        return assistant(self.content, self.tool_calls)

    def json(self):
        """The content parsed as JSON (a Markdown code fence around it is
        removed first). An answer that is not JSON raises `AgentError`, not
        retryable: asking the same model the same thing again is unlikely
        to help."""
        text = self.content.strip()
        if text.startswith("```"):
            text = text[3:]
            if text.startswith("json"):
                text = text[4:]
            if text.endswith("```"):
                text = text[:-3]
        try:
            return json.loads(text)
        except ValueError as err:
            raise AgentError(f"the model's answer is not JSON ({err}): {self.content[:200]}")


def _as_message(m):
    if isinstance(m, _llm.Message):
        return m
    if isinstance(m, dict):
        return _message(
            m["role"],
            m.get("content", ""),
            [c if isinstance(c, ToolCall) else ToolCall(**c) for c in m.get("tool_calls", ())],
            m.get("tool_call_id"),
        )
    raise TypeError(f"a message is llm.user(...), llm.system(...), ... or a dict with 'role', not {type(m).__name__}")


def chat(messages, *, model=None, max_tokens=None, temperature=None, tools=(), response_format=None):
    """One chat completion. `messages`: `system(...)`, `user(...)`,
    `reply.message()`, `tool_result(...)`, or dicts
    (`{"role": "user", "content": "..."}`). `model` absent: the agent's
    configured model or the node's default. `tools`: `Tool`s the model may
    ask for. `response_format`: None (text), `json_object()` or
    `json_schema(...)`. Returns a `Reply`; raises `LlmError`."""
    request = _llm.ChatRequest(
        model=model,
        messages=[_as_message(m) for m in messages],
        max_tokens=max_tokens,
        temperature=None if temperature is None else float(temperature),
        tools=[t if isinstance(t, _llm.Tool) else t._raw() for t in tools],
        response_format=response_format,
    )
    try:
        return Reply(_llm.chat(request))
    except Err as err:
        kind, retryable = _ERRORS.get(type(err.value), ("unknown", False))
        raise LlmError(kind, getattr(err.value, "value", repr(err.value)), retryable) from None
