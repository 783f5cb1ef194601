// node_runtime_agent.js: the JavaScript SDK for node-runtime agents (agent
// world `node-runtime:agent@0.2.0`), one ES module next to `agent.js`.
//
// A thin, idiomatic layer over the bindings componentize-js generates from
// the project's `wit/` while it builds (the `node-runtime:agent/...` and
// `wasi:...` imports below): `agent(handler)` makes the world's `run`
// export from a function that takes a context and returns an object;
// throwing `AgentError` fails the run, saying whether a retry could help.
// `log`, `llm`, `http` and `budget` wrap the world's imports; `sleep`
// waits (JavaScript has no blocking sleep of its own).
//
//   import { agent, AgentError, log } from './node_runtime_agent.js';
//   export const run = agent((ctx) => {
//     const invoice = ctx.input();
//     log.info('checking', { number: invoice.number });
//     return { category: 'invoice' };
//   });

import { remaining as rawRemaining } from 'node-runtime:agent/budget@0.2.0';
import { chat as rawChat } from 'node-runtime:agent/llm@0.2.0';
import { log as rawLog } from 'node-runtime:agent/log@0.2.0';
import { subscribeDuration } from 'wasi:clocks/monotonic-clock@0.2.12';
import { handle } from 'wasi:http/outgoing-handler@0.2.12';
import { Fields, IncomingBody, OutgoingBody, OutgoingRequest } from 'wasi:http/types@0.2.12';

/// Fails the run with kind `agent.error`. `retryable` tells the control
/// plane whether the same input could succeed later (a downstream outage:
/// yes; an input that cannot be parsed: no). The SDK's own errors
/// (`LlmError`, `HttpError`, `Denied`) are `AgentError`s too.
export class AgentError extends Error {
  constructor(message, { retryable = false } = {}) {
    super(message);
    this.name = new.target.name;
    this.retryable = Boolean(retryable);
    // componentize-js turns a thrown value's `payload` into the export's
    // `err`: here, the world's `agent-error`.
    this.payload = { message: String(message), retryable: this.retryable };
  }
}

// The payload of an error an import threw (its `result`'s `err`).
function payloadOf(error) {
  return error !== null && typeof error === 'object' && 'payload' in error ? error.payload : undefined;
}

// A result value as the string the wire carries: strings as they are,
// anything else as JSON.
function resultValue(key, value) {
  if (typeof value === 'string') return value;
  if (typeof value === 'bigint') return value.toString();
  const text = JSON.stringify(value);
  if (text === undefined) throw new TypeError(`result "${key}": a ${typeof value} is not a string or a JSON value`);
  return text;
}

/// Makes the world's `run` export from `handler(ctx)`, which returns an
/// object (the run's result: a string value is sent as it is, any other
/// value as its JSON text) and may throw `AgentError`. Any other thrown
/// value is a crash (a trap), as a panic is in Rust.
///
/// `ctx`: `runId`, `leaseId`, `agentId`, `agentVersion`, `traceId`,
/// `inputRef` and `metadata` (objects), `message` (the input text,
/// `inputRef.message`) and `input()` (it, parsed as JSON).
export function agent(handler) {
  return function run(raw) {
    const ctx = {
      runId: raw.runId,
      leaseId: raw.leaseId,
      agentId: raw.agentId,
      agentVersion: raw.agentVersion,
      traceId: raw.traceId,
      inputRef: Object.fromEntries(raw.inputRef),
      metadata: Object.fromEntries(raw.metadata),
      get message() {
        return Object.hasOwn(this.inputRef, 'message') ? this.inputRef.message : undefined;
      },
      input() {
        const text = this.message;
        if (text === undefined) {
          throw new AgentError('no input: inputRef.message is missing (run-agent: pass --input JSON)');
        }
        try {
          return JSON.parse(text);
        } catch (err) {
          throw new AgentError(`the input is not JSON (${err.message}): ${text.slice(0, 200)}`);
        }
      },
    };
    const result = handler(ctx);
    if (result === undefined || result === null) return [];
    if (typeof result !== 'object' || Array.isArray(result) || typeof result.then === 'function') {
      throw new TypeError('the agent must return a plain object (run is synchronous: no async, no await)');
    }
    return Object.entries(result).map(([key, value]) => [key, resultValue(key, value)]);
  };
}

function emit(level, message, fields = {}) {
  rawLog(level, String(message), Object.entries(fields).map(([k, v]) => [k, String(v)]));
}

/// Structured log lines through the node: `log.info('classified', {
/// category: 'Utilities' })`. Field values become text with `String`.
export const log = {
  trace: (message, fields) => emit('trace', message, fields),
  debug: (message, fields) => emit('debug', message, fields),
  info: (message, fields) => emit('info', message, fields),
  warn: (message, fields) => emit('warn', message, fields),
  error: (message, fields) => emit('error', message, fields),
};

/// What remains of this run's budgets, as numbers: `{ fuel, memoryBytes,
/// timeMs, tokens }`; each counts down from the run's limit.
export const budget = {
  remaining() {
    const r = rawRemaining();
    return { fuel: Number(r.fuel), memoryBytes: Number(r.memoryBytes), timeMs: Number(r.timeMs), tokens: r.tokens };
  },
};

/// Waits `ms` milliseconds (a WASI clock; the run's deadline still
/// applies).
export function sleep(ms) {
  subscribeDuration(BigInt(Math.max(0, Math.round(ms))) * 1_000_000n).block();
}

// ---- llm ----

// The world's llm-error cases, and whether a later run could succeed.
const LLM_RETRYABLE = {
  'not-configured': false,
  'budget-exhausted': false,
  timeout: true,
  provider: true,
  'invalid-request': false,
};

/// `llm.chat` failed. `kind` is the world's case (`not-configured`,
/// `budget-exhausted`, `timeout`, `provider`, `invalid-request`), `detail`
/// the node's message; a provider outage or timeout is retryable.
export class LlmError extends AgentError {
  constructor(kind, detail) {
    super(`the LLM call failed (${kind}): ${detail}`, { retryable: LLM_RETRYABLE[kind] ?? false });
    this.kind = kind;
    this.detail = detail;
  }
}

function toolCall(raw) {
  return {
    id: raw.id,
    name: raw.name,
    arguments: raw.arguments,
    /// The arguments, parsed (check them before use).
    args() {
      try {
        return JSON.parse(this.arguments || '{}');
      } catch (err) {
        throw new AgentError(`the model's arguments for tool "${this.name}" are not JSON (${err.message})`);
      }
    },
  };
}

function message(role, content, toolCalls = [], toolCallId = undefined) {
  return {
    role,
    content: String(content),
    toolCalls: toolCalls.map(({ id, name, arguments: args }) => ({ id, name, arguments: args })),
    toolCallId,
  };
}

function stripFence(text) {
  let trimmed = text.trim();
  if (trimmed.startsWith('```')) {
    trimmed = trimmed.slice(3);
    if (trimmed.startsWith('json')) trimmed = trimmed.slice(4);
    if (trimmed.endsWith('```')) trimmed = trimmed.slice(0, -3);
  }
  return trimmed;
}

/// Chat completion through the node, with tools and structured output:
///
///   const reply = llm.chat({ messages: [llm.system('...'), llm.user(text)],
///                            responseFormat: llm.jsonSchema('invoice', SCHEMA) });
///   const data = reply.json();
export const llm = {
  system: (content) => message('system', content),
  user: (content) => message('user', content),
  /// The model's turn (`reply.message()` builds it).
  assistant: (content, toolCalls = []) => message('assistant', content, toolCalls),
  /// A tool's result, answering call `callId`; a non-string is sent as JSON.
  toolResult: (callId, content) =>
    message('tool', typeof content === 'string' ? content : JSON.stringify(content), [], callId),
  /// A tool the model may ask to call; `parameters` is a JSON Schema
  /// (object or text). The agent calls it and answers with `toolResult`.
  tool: (name, description, parameters = { type: 'object', properties: {} }) => ({
    name,
    description,
    parameters: typeof parameters === 'string' ? parameters : JSON.stringify(parameters),
  }),
  /// `responseFormat`: any JSON object.
  jsonObject: () => ({ tag: 'json-object' }),
  /// `responseFormat`: JSON matching `schema` (object or text); `strict`
  /// asks the provider to follow it exactly.
  jsonSchema: (name, schema, strict = true) => ({
    tag: 'json-schema',
    val: { name, schema: typeof schema === 'string' ? schema : JSON.stringify(schema), strict },
  }),

  /// One chat completion: `messages` (from the helpers above, or `{ role,
  /// content }` objects), optional `model`, `maxTokens`, `temperature`,
  /// `tools`, `responseFormat`. Returns `{ content, toolCalls, model,
  /// tokensIn, tokensOut, finishReason, message(), json() }`; throws
  /// `LlmError`.
  chat({ messages, model, maxTokens, temperature, tools = [], responseFormat } = {}) {
    let raw;
    try {
      raw = rawChat({
        model,
        messages: messages.map((m) => message(m.role, m.content ?? '', m.toolCalls ?? [], m.toolCallId)),
        maxTokens,
        temperature,
        tools,
        responseFormat,
      });
    } catch (err) {
      const payload = payloadOf(err);
      if (payload === undefined) throw err;
      throw new LlmError(payload.tag, payload.val);
    }
    return {
      content: raw.content,
      toolCalls: raw.toolCalls.map(toolCall),
      model: raw.model,
      tokensIn: raw.usage.tokensIn,
      tokensOut: raw.usage.tokensOut,
      finishReason: raw.finishReason,
      /// This answer as the `assistant` message of the next request.
      message() {
        return message('assistant', this.content, this.toolCalls);
      },
      /// The content parsed as JSON (a Markdown fence removed); not JSON:
      /// `AgentError`, not retryable.
      json() {
        try {
          return JSON.parse(stripFence(this.content));
        } catch (err) {
          throw new AgentError(`the model's answer is not JSON (${err.message}): ${this.content.slice(0, 200)}`);
        }
      },
    };
  },
};

// ---- http ----

/// The request got no usable response. `url`, `code` (the `wasi:http`
/// error code, e.g. `connection-refused`, or undefined) and `status` (for
/// `raiseForStatus()`) say which.
export class HttpError extends AgentError {
  constructor(message, { url, code, status, retryable = true } = {}) {
    super(message, { retryable });
    this.url = url;
    this.code = code;
    this.status = status;
  }
}

/// The node refused the request: its host is not on the run's allow-list
/// (or the run has too many requests in flight). Not retryable.
export class Denied extends HttpError {}

// Bytes of a response body read at most, unless a call says otherwise.
const DEFAULT_MAX_BYTES = 16 * 1024 * 1024;
// blockingWriteAndFlush takes at most 4096 bytes at a time.
const WRITE_CHUNK = 4096;
const METHODS = new Set(['get', 'head', 'post', 'put', 'delete', 'connect', 'options', 'trace', 'patch']);

// The authority without its user information (`user:pass@`): what an
// allow-list names, and what a message may show.
function hostOf(authority) {
  return authority.slice(authority.lastIndexOf('@') + 1);
}

function failure(url, authority, code) {
  const tag = code && code.tag;
  if (tag === 'HTTP-request-denied') {
    const host = hostOf(authority);
    const shown = url.replace(/^(https?:\/\/)[^/?#]*@/, '$1***@');
    return new Denied(
      `the node denied the request to ${host} (${shown}): the host is not on this run's allow-list ` +
        `(run-agent: add --allow-http ${host}; a node: add it to Sandbox.Grants.<agentId>.AllowedHosts), ` +
        'or the run has too many requests in flight',
      { url, code: tag, retryable: false },
    );
  }
  // A malformed request fails the same way every time; a connection, DNS
  // or protocol failure may pass later.
  const retryable = !(String(tag).startsWith('HTTP-request') || tag === 'configuration-error');
  const detail = code && code.val !== undefined ? `: ${JSON.stringify(code.val)}` : '';
  return new HttpError(`the request to ${url} failed: ${tag}${detail}`, { url, code: tag, retryable });
}

function split(url) {
  const match = /^(https?):\/\/([^/?#]+)([^#]*)/.exec(url);
  if (!match) {
    throw new HttpError(`${JSON.stringify(url)} is not an http:// or https:// URL with a host`, {
      url,
      retryable: false,
    });
  }
  let path = match[3] || '/';
  if (path.startsWith('?')) path = `/${path}`;
  return { scheme: match[1].toUpperCase(), authority: match[2], path };
}

function writeBody(outgoing, bytes) {
  const stream = outgoing.write();
  try {
    for (let start = 0; start < bytes.length; start += WRITE_CHUNK) {
      stream.blockingWriteAndFlush(bytes.subarray(start, start + WRITE_CHUNK));
    }
  } finally {
    // The stream must be released before the body is finished.
    stream[Symbol.dispose]();
  }
  OutgoingBody.finish(outgoing, undefined);
}

function readResponse(url, incoming, maxBytes) {
  const status = incoming.status();
  const headers = {};
  const decoder = new TextDecoder();
  for (const [name, value] of incoming.headers().entries()) {
    const text = decoder.decode(value);
    headers[name] = Object.hasOwn(headers, name) ? `${headers[name]}, ${text}` : text;
  }
  const body = incoming.consume();
  const stream = body.stream();
  const chunks = [];
  let size = 0;
  try {
    for (;;) {
      let chunk;
      try {
        chunk = stream.blockingRead(65536n);
      } catch (err) {
        const payload = payloadOf(err);
        if (payload && payload.tag === 'closed') break;
        throw new HttpError(`reading the response of ${url} failed: ${JSON.stringify(payload ?? String(err))}`, {
          url,
          status,
        });
      }
      size += chunk.length;
      if (size > maxBytes) {
        throw new HttpError(`the response of ${url} is larger than ${maxBytes} bytes (raise maxBytes)`, {
          url,
          status,
          retryable: false,
        });
      }
      chunks.push(chunk);
    }
  } finally {
    stream[Symbol.dispose]();
  }
  IncomingBody.finish(body);
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.length;
  }
  return {
    url,
    status,
    headers,
    body: bytes,
    get ok() {
      return this.status >= 200 && this.status < 300;
    },
    text() {
      return new TextDecoder().decode(this.body);
    },
    json() {
      try {
        return JSON.parse(this.text());
      } catch (err) {
        throw new HttpError(`${url} answered ${status} with a body that is not JSON (${err.message})`, {
          url,
          status,
          retryable: false,
        });
      }
    },
    /// Throws `HttpError` for a 4xx (not retryable) or 5xx (retryable).
    raiseForStatus() {
      if (this.status >= 400) {
        throw new HttpError(`${url} answered ${status}`, { url, status, retryable: this.status >= 500 });
      }
      return this;
    },
  };
}

/// Outbound HTTP over `wasi:http`, blocking: `http.post(url, { json: {...},
/// headers: {...} })`. The node lets a request through only to the hosts
/// on the run's allow-list; a refused request throws `Denied`, one that got
/// no response `HttpError`. Any status is returned (`{ status, headers,
/// body, ok, text(), json(), raiseForStatus() }`), not thrown.
export const http = {
  request(method, url, { headers = {}, body, json, maxBytes = DEFAULT_MAX_BYTES } = {}) {
    const { scheme, authority, path } = split(url);
    const fields = {};
    for (const [k, v] of Object.entries(headers)) fields[k.toLowerCase()] = String(v);
    if (json !== undefined) {
      body = JSON.stringify(json);
      if (!Object.hasOwn(fields, 'content-type')) fields['content-type'] = 'application/json';
    }
    const bytes = typeof body === 'string' ? new TextEncoder().encode(body) : (body ?? new Uint8Array());
    const lower = method.toLowerCase();
    let outgoing;
    let pending;
    try {
      const encoder = new TextEncoder();
      const request = new OutgoingRequest(Fields.fromList(Object.entries(fields).map(([k, v]) => [k, encoder.encode(v)])));
      request.setMethod(METHODS.has(lower) ? { tag: lower } : { tag: 'other', val: method });
      request.setScheme({ tag: scheme }); // WIT names the cases HTTP and HTTPS
      request.setAuthority(authority);
      request.setPathWithQuery(path);
      outgoing = request.body();
      pending = handle(request, undefined);
    } catch (err) {
      const payload = payloadOf(err);
      if (payload === undefined) throw err;
      // An error code, or a header or field the request cannot carry (final).
      if (payload && typeof payload.tag === 'string' && !['invalid-syntax', 'forbidden', 'immutable'].includes(payload.tag)) {
        throw failure(url, authority, payload);
      }
      throw new HttpError(`the request to ${url} cannot be sent: ${JSON.stringify(payload)}`, { url, retryable: false });
    }
    try {
      writeBody(outgoing, bytes);
    } catch (err) {
      // A request the node refuses (or a connection that fails) closes the
      // body's stream; the response future below says why.
      if (payloadOf(err) === undefined) throw err;
    }
    pending.subscribe().block();
    const answer = pending.get();
    if (answer === undefined || answer.tag !== 'ok') {
      throw new HttpError(`the request to ${url} got no response`, { url });
    }
    if (answer.val.tag !== 'ok') throw failure(url, authority, answer.val.val);
    return readResponse(url, answer.val.val, maxBytes);
  },
  get: (url, options) => http.request('GET', url, options),
  post: (url, options) => http.request('POST', url, options),
};
