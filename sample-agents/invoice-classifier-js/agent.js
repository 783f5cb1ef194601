// Invoice classifier, in JavaScript: the same agent as the Rust
// `invoice-classifier`, made a component against the agent world 0.2.0
// (`wit/v0.2`, named in this folder's `wit-path`) by `scripts/build-agents`,
// on the kit's JavaScript SDK (`kit/js/sdk/node_runtime_agent.js`, which
// `scripts/build-agents` copies beside this file for the build).
//
// It reads an invoice (JSON in `input_ref["message"]`), asks the node's LLM
// to classify the vendor with an answer matching a JSON Schema (the world's
// structured output), checks the model's answer field by field, posts
// the classified invoice to the target API named by metadata `target_url`
// (with an `Idempotency-Key` of `{run id}-{message id}`, so a retried run
// never files an invoice twice), and returns the classification.
//
// Failures say whether a retry can help: a model answer that is not the
// JSON asked for is final, and so is a target API the node denies (the same
// run would be denied again); a target API that keeps answering 5xx after
// the agent's own few retries is worth another run later.

import { agent, AgentError, HttpError, LlmError, http, llm, log, sleep } from './node_runtime_agent.js';

// The categories the model may choose, each with the department its
// invoices go to.
const ROUTING = {
  'Office Supplies': 'Procurement Department',
  'Technology/Hardware': 'IT Department',
  'Professional Services': 'Finance Department',
  'Utilities': 'Facilities Management',
  'Travel & Expenses': 'HR Department',
  'Other': 'General Accounts Payable',
};

const DEFAULT_INSTRUCTIONS =
  'You classify vendor invoices. Answer with one JSON object and nothing else, with the ' +
  'fields vendorName (string), vendorCategory (one of: Office Supplies, Technology/Hardware, ' +
  'Professional Services, Utilities, Travel & Expenses, Other), invoiceNumber (string), ' +
  'invoiceDate (string, YYYY-MM-DD), totalAmount (number), currency (ISO 4217 code), ' +
  'routingDestination (the department for the category: Office Supplies -> Procurement ' +
  'Department, Technology/Hardware -> IT Department, Professional Services -> Finance ' +
  'Department, Utilities -> Facilities Management, Travel & Expenses -> HR Department, ' +
  'Other -> General Accounts Payable) and confidence (a number from 0 to 1).';

// The answer asked of the model, as a JSON Schema (strict: every field
// required, no others), so a provider that supports structured output
// answers in exactly this shape; the answer is still checked below.
const SCHEMA = {
  type: 'object',
  properties: {
    vendorName: { type: 'string' },
    vendorCategory: { type: 'string', enum: Object.keys(ROUTING) },
    invoiceNumber: { type: 'string' },
    invoiceDate: { type: 'string', description: 'YYYY-MM-DD' },
    totalAmount: { type: 'number' },
    currency: { type: 'string', description: 'ISO 4217' },
    routingDestination: { type: 'string', enum: Object.values(ROUTING) },
    confidence: { type: 'number' },
  },
  required: [
    'vendorName', 'vendorCategory', 'invoiceNumber', 'invoiceDate',
    'totalAmount', 'currency', 'routingDestination', 'confidence',
  ],
  additionalProperties: false,
};

// Attempts at the target API before giving up on this run.
const TARGET_ATTEMPTS = 3;

// The classification's fields, in the order they are posted, and their types.
const FIELDS = [
  ['vendorName', 'string'],
  ['vendorCategory', 'string'],
  ['invoiceNumber', 'string'],
  ['invoiceDate', 'string'],
  ['totalAmount', 'number'],
  ['currency', 'string'],
  ['routingDestination', 'string'],
  ['confidence', 'number'],
];

export const run = agent((ctx) => {
  const invoice = ctx.message;
  if (invoice === undefined) {
    throw new AgentError('no invoice: input_ref["message"] is missing');
  }
  try {
    JSON.parse(invoice);
  } catch (err) {
    throw new AgentError(`the invoice is not JSON: ${err.message}`);
  }
  const instructions = ctx.metadata.instructions || DEFAULT_INSTRUCTIONS;

  let answer;
  try {
    answer = llm.chat({
      messages: [llm.system(instructions), llm.user(invoice)],
      maxTokens: 400,
      temperature: 0.0,
      responseFormat: llm.jsonSchema('invoice_classification', SCHEMA, true),
    });
  } catch (err) {
    if (!(err instanceof LlmError)) throw err;
    // A provider outage or timeout is worth a later run; a missing
    // endpoint, a spent budget or a refused request is not.
    const verb = err.retryable ? 'failed' : 'refused';
    throw new AgentError(`the LLM ${verb}: ${err.detail}`, { retryable: err.retryable });
  }

  const classification = parse(answer.content);
  log.info('invoice classified', {
    category: classification.vendorCategory,
    confidence: classification.confidence,
  });

  const target = ctx.metadata.target_url;
  if (target !== undefined) {
    const messageId = ctx.inputRef.messageId ?? classification.invoiceNumber;
    // JSON.stringify writes 100 where Rust writes 100.0; a JSON reader
    // sees the same number.
    postWithRetries(target, `${ctx.runId}-${messageId}`, classification);
  }

  const result = {};
  for (const [name] of FIELDS) result[name] = String(classification[name]);
  result.tokensIn = String(answer.tokensIn);
  result.tokensOut = String(answer.tokensOut);
  return result;
});

// The model's answer as a checked classification; any deviation is a final
// error, since asking the same model the same thing again is unlikely to
// help.
function parse(content) {
  // Models like to wrap JSON in a Markdown fence.
  let trimmed = content.trim();
  while (trimmed.startsWith('```json')) trimmed = trimmed.slice(7);
  while (trimmed.startsWith('```')) trimmed = trimmed.slice(3);
  while (trimmed.endsWith('```')) trimmed = trimmed.slice(0, -3);
  trimmed = trimmed.trim();

  const refuse = (why) =>
    new AgentError(`the model's answer is not the classification asked for (${why}): ${content.slice(0, 200)}`);
  let value;
  try {
    value = JSON.parse(trimmed);
  } catch (err) {
    throw refuse(err.message);
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw refuse('not a JSON object');
  }
  const known = new Set(FIELDS.map(([name]) => name));
  const unknown = Object.keys(value).filter((name) => !known.has(name)).sort();
  if (unknown.length > 0) throw refuse(`unknown field "${unknown[0]}"`);
  const classification = {};
  for (const [name, type] of FIELDS) {
    if (!(name in value)) throw refuse(`missing field "${name}"`);
    if (typeof value[name] !== type) throw refuse(`field "${name}" is not a ${type}`);
    classification[name] = value[name];
  }

  const category = classification.vendorCategory;
  const department = Object.hasOwn(ROUTING, category) ? ROUTING[category] : undefined;
  if (department === undefined) {
    throw new AgentError(`the model chose an unknown category ${JSON.stringify(category)}`);
  }
  if (classification.routingDestination !== department) {
    throw new AgentError(
      `the model routed ${JSON.stringify(category)} to ` +
        `${JSON.stringify(classification.routingDestination)}; it goes to ${JSON.stringify(department)}`,
    );
  }
  if (!(classification.confidence >= 0 && classification.confidence <= 1)) {
    throw new AgentError(`the model's confidence ${classification.confidence} is outside 0..1`);
  }
  return classification;
}

// POSTs to the target API, retrying a 5xx or a transport error a few times;
// a 4xx, or the node's denial, is final.
function postWithRetries(url, idempotencyKey, classification) {
  let last = '';
  for (let attempt = 1; attempt <= TARGET_ATTEMPTS; attempt++) {
    let response;
    try {
      response = http.post(url, { json: classification, headers: { 'idempotency-key': idempotencyKey } });
    } catch (err) {
      if (!(err instanceof HttpError) || !err.retryable) throw err;
      last = err.message;
    }
    if (response !== undefined) {
      if (response.ok) return;
      if (response.status < 500) {
        throw new AgentError(`the target API refused the invoice with ${response.status}`);
      }
      last = `the target API answered ${response.status}`;
    }
    if (attempt < TARGET_ATTEMPTS) sleep(100 << attempt);
  }
  throw new AgentError(`${last} after ${TARGET_ATTEMPTS} attempts`, { retryable: true });
}
