"""{{name}}: a node-runtime agent in Python.

The node calls `handle` once per run with the run's context; the returned
dict becomes the run's result. Raise `AgentError(message, retryable=...)`
to fail the run. The SDK (`node_runtime_agent/`) also has `llm.chat`,
`http.get`/`http.post` and `budget.remaining()`.
"""

from node_runtime_agent import Agent, AgentError, log


class WitWorld(Agent):
    def handle(self, ctx):
        # The input is the JSON given to `run-agent --input` (or the
        # control plane's message).
        invoice = ctx.input()
        if (
            not isinstance(invoice, dict)
            or not isinstance(invoice.get("invoice"), str)
            or not isinstance(invoice.get("amount", 0), (int, float))
        ):
            # The same input would fail again: not retryable.
            raise AgentError('the input is not {"invoice": "...", "amount": N}', retryable=False)
        number = invoice["invoice"]
        amount = invoice.get("amount", 0)
        log.info("checking invoice", invoice=number, run=ctx.run_id)
        return {
            "invoice": number,
            "size": "large" if amount >= 1000 else "small",
            "checked_by": "{{name}}",
        }
