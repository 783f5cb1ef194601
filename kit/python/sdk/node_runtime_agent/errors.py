"""The SDK's one error type: raise `AgentError` to fail a run.

The errors the SDK itself raises (`llm.LlmError`, `http.HttpError`,
`http.Denied`) are `AgentError`s too, each with the `retryable` its cause
calls for, so an agent that does not catch them still fails the run
truthfully."""


class AgentError(Exception):
    """Fails the run with kind `agent.error`. `retryable` tells the control
    plane whether the same input could succeed later (a downstream outage:
    yes; an input that cannot be parsed: no). Note that the reference
    plane never re-queues a failed run, so a retryable failure still ends
    the run."""

    def __init__(self, message, retryable=False):
        super().__init__(message)
        self.message = str(message)
        self.retryable = bool(retryable)

    def __repr__(self):
        return f"{type(self).__name__}({self.message!r}, retryable={self.retryable})"
