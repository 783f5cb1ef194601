"""node_runtime_agent: the Python SDK for node-runtime agents (agent world
`node-runtime:agent@0.2.0`).

A thin, idiomatic layer over the bindings componentize-py generates from the
project's `wit/` at build time (`wit_world`): an agent subclasses `Agent`,
implements `handle(ctx)` and returns a dict; raising `AgentError` fails the
run, saying whether a retry could help. `log`, `llm`, `http` and `budget`
wrap the world's imports.

    from node_runtime_agent import Agent, AgentError, log

    class WitWorld(Agent):
        def handle(self, ctx):
            invoice = ctx.input()
            log.info("checking", number=invoice["number"])
            return {"category": "invoice"}
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import node_runtime_agent_types as _types

from . import budget, http, llm, log
from .errors import AgentError

__all__ = ["Agent", "AgentError", "Context", "budget", "http", "llm", "log"]


class Context:
    """What the node knows about this run (the world's `run-context`), with
    `input_ref` and `metadata` as dicts (a repeated key keeps its last
    value, as on the wire)."""

    def __init__(self, raw):
        self.run_id = raw.run_id
        self.lease_id = raw.lease_id
        self.agent_id = raw.agent_id
        self.agent_version = raw.agent_version
        self.trace_id = raw.trace_id
        self.input_ref = dict(raw.input_ref)
        self.metadata = dict(raw.metadata)

    @property
    def message(self):
        """The run's input as text: `input_ref["message"]`, where the control
        plane and `run-agent --input` put it; None when absent."""
        return self.input_ref.get("message")

    def input(self):
        """The run's input, parsed as JSON. Missing or malformed input fails
        the run for good (`AgentError`, not retryable): the same input
        will not parse next time either."""
        text = self.message
        if text is None:
            raise AgentError('no input: input_ref["message"] is missing (run-agent: pass --input JSON)')
        try:
            return json.loads(text)
        except ValueError as err:
            raise AgentError(f'the input is not JSON ({err}): {text[:200]}')


def _result_value(key, value):
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float, list, dict)) or value is None:
        return json.dumps(value)
    raise TypeError(f"result {key!r}: {type(value).__name__} is not a string or a JSON value")


class Agent(wit_world.WitWorld):
    """The base of an agent's `WitWorld` class: it implements the world's
    `run` export around `handle(ctx)`.

    `handle` returns a dict, the run's result: a string value is sent as
    it is, a number, bool, list, dict or None as its JSON text. Raising
    `AgentError` (or one of the SDK's errors, which are `AgentError`s)
    fails the run with kind `agent.error`; any other exception is a crash
    (a trap), as a panic is in Rust."""

    def handle(self, ctx: Context) -> dict:
        raise NotImplementedError("implement handle(self, ctx) in your WitWorld class")

    def run(self, context):
        try:
            result = self.handle(Context(context))
        except AgentError as err:
            raise Err(_types.AgentError(message=err.message, retryable=err.retryable))
        if result is None:
            return []
        if not isinstance(result, dict):
            raise TypeError(f"handle() must return a dict, not {type(result).__name__}")
        return [(str(key), _result_value(key, value)) for key, value in result.items()]
