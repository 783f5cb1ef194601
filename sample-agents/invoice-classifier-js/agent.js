// Invoice classifier, in JavaScript: the same agent as the Rust
// `invoice-classifier`, made a component against the agent world 0.2.0
// (`wit/v0.2`, named in this folder's `wit-path`) by `scripts/build-agents`.
//
// It reads an invoice (JSON in `input_ref["message"]`), asks the node's LLM
// to classify the vendor with an answer matching a JSON Schema (the world's
// structured output), checks the model's answer field by field, posts
// the classified invoice to the target API named by metadata `target_url`
// (with an `Idempotency-Key` of `{run id}-{message id}`, so a retried run
// never files an invoice twice), and returns the classification.
//
// Failures say whether a retry can help: a model answer that is not the
// JSON asked for is final; a target API that keeps answering 5xx after the
// agent's own few retries is worth another run later.
//
// The imports below are the world's interfaces; the componentizer binds
// them, nothing generated is checked in.

import { chat } from 'node-runtime:agent/llm@0.2.0';
import { log } from 'node-runtime:agent/log@0.2.0';
import { handle } from 'wasi:http/outgoing-handler@0.2.12';
import { Fields, OutgoingBody, OutgoingRequest } from 'wasi:http/types@0.2.12';
import { subscribeDuration } from 'wasi:clocks/monotonic-clock@0.2.12';

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

/// An `agent-error`, thrown: the binding turns the payload into `err`.
class AgentFailure extends Error {
  constructor(message, retryable) {
    super(message);
    this.payload = { message, retryable };
  }
}

// The last value for `key` (a repeated key keeps its last value).
function lookup(pairs, key) {
  let found;
  for (const [k, v] of pairs) {
    if (k === key) found = v;
  }
  return found;
}

// The payload of an error thrown by an import that returns `result`.
function payloadOf(error) {
  return error && typeof error === 'object' && 'payload' in error ? error.payload : error;
}

// What went wrong, for a message: an import's error payload, or a
// JavaScript error's own text.
function describe(err) {
  if (err && typeof err === 'object' && 'payload' in err) return JSON.stringify(err.payload);
  return String(err);
}

export function run(context) {
  const invoice = lookup(context.inputRef, 'message');
  if (invoice === undefined) {
    throw new AgentFailure('no invoice: input_ref["message"] is missing', false);
  }
  try {
    JSON.parse(invoice);
  } catch (err) {
    throw new AgentFailure(`the invoice is not JSON: ${err.message}`, false);
  }
  const instructions = lookup(context.metadata, 'instructions') || DEFAULT_INSTRUCTIONS;

  let answer;
  try {
    answer = chat({
      model: undefined,
      messages: [
        { role: 'system', content: instructions, toolCalls: [], toolCallId: undefined },
        { role: 'user', content: invoice, toolCalls: [], toolCallId: undefined },
      ],
      maxTokens: 400,
      temperature: 0.0,
      tools: [],
      responseFormat: {
        tag: 'json-schema',
        val: { name: 'invoice_classification', schema: JSON.stringify(SCHEMA), strict: true },
      },
    });
  } catch (err) {
    const error = payloadOf(err);
    if (error && (error.tag === 'timeout' || error.tag === 'provider')) {
      throw new AgentFailure(`the LLM failed: ${error.val}`, true);
    }
    throw new AgentFailure(`the LLM refused: ${JSON.stringify(error)}`, false);
  }

  const classification = parse(answer.content);
  log('info', 'invoice classified', [
    ['category', classification.vendorCategory],
    ['confidence', String(classification.confidence)],
  ]);

  const target = lookup(context.metadata, 'target_url');
  if (target !== undefined) {
    const messageId = lookup(context.inputRef, 'messageId') ?? classification.invoiceNumber;
    const key = `${context.runId}-${messageId}`;
    // JSON.stringify writes 100 where Rust writes 100.0; a JSON reader
    // sees the same number.
    const body = new TextEncoder().encode(JSON.stringify(classification));
    postWithRetries(target, key, body);
  }

  const result = FIELDS.map(([name]) => [name, String(classification[name])]);
  result.push(['tokensIn', String(answer.usage.tokensIn)]);
  result.push(['tokensOut', String(answer.usage.tokensOut)]);
  return result;
}

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
    new AgentFailure(
      `the model's answer is not the classification asked for (${why}): ${content.slice(0, 200)}`,
      false,
    );
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
    throw new AgentFailure(`the model chose an unknown category ${JSON.stringify(category)}`, false);
  }
  if (classification.routingDestination !== department) {
    throw new AgentFailure(
      `the model routed ${JSON.stringify(category)} to ` +
        `${JSON.stringify(classification.routingDestination)}; it goes to ${JSON.stringify(department)}`,
      false,
    );
  }
  if (!(classification.confidence >= 0 && classification.confidence <= 1)) {
    throw new AgentFailure(`the model's confidence ${classification.confidence} is outside 0..1`, false);
  }
  return classification;
}

// POSTs to the target API, retrying a 5xx or a transport error a few times;
// a 4xx is final.
function postWithRetries(url, idempotencyKey, body) {
  let last = '';
  for (let attempt = 1; attempt <= TARGET_ATTEMPTS; attempt++) {
    const sent = post(url, idempotencyKey, body);
    if (sent.status !== undefined) {
      if (sent.status >= 200 && sent.status < 300) return;
      if (sent.status < 500) {
        throw new AgentFailure(`the target API refused the invoice with ${sent.status}`, false);
      }
      last = `the target API answered ${sent.status}`;
    } else {
      last = sent.error;
    }
    if (attempt < TARGET_ATTEMPTS) {
      // A blocking sleep: JavaScript has none of its own.
      subscribeDuration(BigInt(100 << attempt) * 1_000_000n).block();
    }
  }
  throw new AgentFailure(`${last} after ${TARGET_ATTEMPTS} attempts`, true);
}

// One POST: `{ status }`, or `{ error }` saying why there was none.
function post(url, idempotencyKey, body) {
  const match = /^(https?):\/\/([^/]*)(\/.*)?$/.exec(url);
  if (!match) {
    return { error: `target_url ${JSON.stringify(url)} is not an http:// or https:// URL` };
  }
  const [, scheme, authority, path = '/'] = match;
  try {
    const headers = Fields.fromList([
      ['content-type', new TextEncoder().encode('application/json')],
      ['idempotency-key', new TextEncoder().encode(idempotencyKey)],
    ]);
    const request = new OutgoingRequest(headers);
    request.setMethod({ tag: 'post' });
    request.setScheme({ tag: scheme.toUpperCase() }); // WIT names the cases HTTP and HTTPS
    request.setAuthority(authority);
    request.setPathWithQuery(path);
    const outgoing = request.body();
    const pending = handle(request, undefined);
    const stream = outgoing.write();
    // blockingWriteAndFlush takes at most 4096 bytes at a time.
    for (let start = 0; start < body.length; start += 4096) {
      stream.blockingWriteAndFlush(body.subarray(start, start + 4096));
    }
    // The stream must be dropped before the body is finished.
    stream[Symbol.dispose]();
    OutgoingBody.finish(outgoing, undefined);
    pending.subscribe().block();
    const response = pending.get();
    if (response === undefined || response.tag !== 'ok') return { error: 'no response' };
    if (response.val.tag !== 'ok') return { error: JSON.stringify(response.val.val) };
    return { status: response.val.val.status() };
  } catch (err) {
    return { error: describe(err) };
  }
}
