// {{name}}: a node-runtime agent in JavaScript.
//
// The node calls `run` once per run with the run's context; the returned
// object becomes the run's result. Throw `new AgentError(message, {
// retryable })` to fail the run. The SDK (`node_runtime_agent.js`) also has
// `llm.chat`, `http.get`/`http.post`, `budget.remaining()` and `sleep`.
// `run` is synchronous: no async, no await.

import { agent, AgentError, log } from './node_runtime_agent.js';

export const run = agent((ctx) => {
  // The input is the JSON given to `run-agent --input` (or the control
  // plane's message).
  const invoice = ctx.input();
  if (typeof invoice.invoice !== 'string') {
    throw new AgentError('the input has no "invoice" string', { retryable: false });
  }
  const amount = invoice.amount ?? 0;
  log.info('checking invoice', { invoice: invoice.invoice, run: ctx.runId });
  return {
    invoice: invoice.invoice,
    size: amount >= 1000 ? 'large' : 'small',
    checked_by: '{{name}}',
  };
});
