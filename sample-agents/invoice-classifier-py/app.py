"""Invoice classifier, in Python: the same agent as the Rust
`invoice-classifier`, built with componentize-py against the agent world
0.2.0 (`wit/v0.2`, named in this folder's `wit-path`) on the kit's Python
SDK (`kit/python/sdk/node_runtime_agent`, which `scripts/build-agents` puts
on the Python path).

It reads an invoice (JSON in `input_ref["message"]`), asks the node's LLM
to classify the vendor with an answer matching a JSON Schema (the world's
structured output), checks the model's answer field by field, posts the
classified invoice to the target API named by metadata `target_url` (with an
`Idempotency-Key` of `{run id}-{message id}`, so a retried run never files an
invoice twice), and returns the classification.

Failures say whether a retry can help: a model answer that is not the JSON
asked for is final, and so is a target API the node denies (the same run
would be denied again); a target API that keeps answering 5xx after the
agent's own few retries is worth another run later.
"""

import json
import math
import time

from node_runtime_agent import Agent, AgentError, http, llm, log

# The categories the model may choose, each with the department its invoices
# go to.
ROUTING = {
    "Office Supplies": "Procurement Department",
    "Technology/Hardware": "IT Department",
    "Professional Services": "Finance Department",
    "Utilities": "Facilities Management",
    "Travel & Expenses": "HR Department",
    "Other": "General Accounts Payable",
}

DEFAULT_INSTRUCTIONS = (
    "You classify vendor invoices. Answer with one JSON object and nothing else, with the "
    "fields vendorName (string), vendorCategory (one of: Office Supplies, Technology/Hardware, "
    "Professional Services, Utilities, Travel & Expenses, Other), invoiceNumber (string), "
    "invoiceDate (string, YYYY-MM-DD), totalAmount (number), currency (ISO 4217 code), "
    "routingDestination (the department for the category: Office Supplies -> Procurement "
    "Department, Technology/Hardware -> IT Department, Professional Services -> Finance "
    "Department, Utilities -> Facilities Management, Travel & Expenses -> HR Department, "
    "Other -> General Accounts Payable) and confidence (a number from 0 to 1)."
)

# The answer asked of the model, as a JSON Schema (strict: every field
# required, no others), so a provider that supports structured output
# answers in exactly this shape; the answer is still checked below.
SCHEMA = {
    "type": "object",
    "properties": {
        "vendorName": {"type": "string"},
        "vendorCategory": {"type": "string", "enum": list(ROUTING)},
        "invoiceNumber": {"type": "string"},
        "invoiceDate": {"type": "string", "description": "YYYY-MM-DD"},
        "totalAmount": {"type": "number"},
        "currency": {"type": "string", "description": "ISO 4217"},
        "routingDestination": {"type": "string", "enum": list(ROUTING.values())},
        "confidence": {"type": "number"},
    },
    "required": [
        "vendorName",
        "vendorCategory",
        "invoiceNumber",
        "invoiceDate",
        "totalAmount",
        "currency",
        "routingDestination",
        "confidence",
    ],
    "additionalProperties": False,
}

# Attempts at the target API before giving up on this run.
TARGET_ATTEMPTS = 3

# The classification's fields, in the order they are posted, and their types.
FIELDS = [
    ("vendorName", str),
    ("vendorCategory", str),
    ("invoiceNumber", str),
    ("invoiceDate", str),
    ("totalAmount", float),
    ("currency", str),
    ("routingDestination", str),
    ("confidence", float),
]


def number_text(value):
    """A number as Rust's `f64` prints it: `100`, not `100.0`."""
    value = float(value)
    if value.is_integer() and math.isfinite(value):
        return str(int(value))
    return repr(value)


class WitWorld(Agent):
    def handle(self, ctx):
        invoice = ctx.message
        if invoice is None:
            raise AgentError('no invoice: input_ref["message"] is missing')
        try:
            json.loads(invoice)
        except ValueError as err:
            raise AgentError(f"the invoice is not JSON: {err}")
        instructions = ctx.metadata.get("instructions") or DEFAULT_INSTRUCTIONS

        try:
            answer = llm.chat(
                [llm.system(instructions), llm.user(invoice)],
                max_tokens=400,
                temperature=0.0,
                response_format=llm.json_schema("invoice_classification", SCHEMA, strict=True),
            )
        except llm.LlmError as err:
            # A provider outage or timeout is worth a later run; a missing
            # endpoint, a spent budget or a refused request is not.
            verb = "failed" if err.retryable else "refused"
            raise AgentError(f"the LLM {verb}: {err.detail}", retryable=err.retryable)

        classification = parse(answer.content)
        log.info(
            "invoice classified",
            category=classification["vendorCategory"],
            confidence=number_text(classification["confidence"]),
        )

        target = ctx.metadata.get("target_url")
        if target is not None:
            message_id = ctx.input_ref.get("messageId") or classification["invoiceNumber"]
            key = f"{ctx.run_id}-{message_id}"
            post_with_retries(target, key, classification)

        result = {
            name: number_text(classification[name]) if kind is float else classification[name]
            for name, kind in FIELDS
        }
        result["tokensIn"] = str(answer.tokens_in)
        result["tokensOut"] = str(answer.tokens_out)
        return result


def parse(content):
    """The model's answer as a checked classification; any deviation is a
    final error, since asking the same model the same thing again is
    unlikely to help."""
    # Models like to wrap JSON in a Markdown fence.
    trimmed = content.strip()
    while trimmed.startswith("```json"):
        trimmed = trimmed[len("```json"):]
    while trimmed.startswith("```"):
        trimmed = trimmed[3:]
    while trimmed.endswith("```"):
        trimmed = trimmed[:-3]
    trimmed = trimmed.strip()

    def refuse(why):
        return AgentError(f"the model's answer is not the classification asked for ({why}): {content[:200]}")

    try:
        value = json.loads(trimmed)
    except ValueError as err:
        raise refuse(err)
    if not isinstance(value, dict):
        raise refuse("not a JSON object")
    expected = {name for name, _ in FIELDS}
    unknown = sorted(set(value) - expected)
    if unknown:
        raise refuse(f"unknown field {unknown[0]!r}")
    for name, kind in FIELDS:
        if name not in value:
            raise refuse(f"missing field {name!r}")
        field = value[name]
        ok = (
            isinstance(field, str)
            if kind is str
            else isinstance(field, (int, float)) and not isinstance(field, bool)
        )
        if not ok:
            raise refuse(f"field {name!r} is not a {'string' if kind is str else 'number'}")
    classification = {name: value[name] for name, _ in FIELDS}
    classification["totalAmount"] = float(classification["totalAmount"])
    classification["confidence"] = float(classification["confidence"])

    category = classification["vendorCategory"]
    department = ROUTING.get(category)
    if department is None:
        raise AgentError(f"the model chose an unknown category {json.dumps(category)}")
    if classification["routingDestination"] != department:
        raise AgentError(
            f"the model routed {json.dumps(category)} to "
            f"{json.dumps(classification['routingDestination'])}; it goes to {json.dumps(department)}"
        )
    if not 0.0 <= classification["confidence"] <= 1.0:
        raise AgentError(f"the model's confidence {number_text(classification['confidence'])} is outside 0..1")
    return classification


def post_with_retries(url, idempotency_key, classification):
    """POSTs to the target API, retrying a 5xx or a transport error a few
    times; a 4xx, or the node's denial, is final."""
    last = ""
    for attempt in range(1, TARGET_ATTEMPTS + 1):
        try:
            response = http.post(url, json=classification, headers={"idempotency-key": idempotency_key})
        except http.HttpError as err:
            if not err.retryable:
                raise
            last = str(err)
        else:
            if response.ok:
                return
            if response.status >= 500:
                last = f"the target API answered {response.status}"
            else:
                raise AgentError(f"the target API refused the invoice with {response.status}")
        if attempt < TARGET_ATTEMPTS:
            time.sleep((100 << attempt) / 1000)
    raise AgentError(f"{last} after {TARGET_ATTEMPTS} attempts", retryable=True)
