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
  const amount = invoice?.amount ?? 0;
  if (typeof invoice !== 'object' || typeof invoice?.invoice !== 'string' || typeof amount !== 'number') {
    // The same input would fail again: not retryable.
    throw new AgentError('the input is not {"invoice": "...", "amount": N}', { retryable: false });
  }
  log.info('checking invoice', { invoice: invoice.invoice, run: ctx.runId });
  return {
    invoice: invoice.invoice,
    size: amount >= 1000 ? 'large' : 'small',
    checked_by: '{{name}}',
  };
});
