//! Invoice classifier: a real business-process agent.
//!
//! It reads an invoice (JSON in `input_ref["message"]`), asks the node's LLM
//! to classify the vendor, checks the model's answer field by field, posts
//! the classified invoice to the target API named by metadata `target_url`
//! (with an `Idempotency-Key` of `{run id}-{message id}`, so a retried run
//! never files an invoice twice), and returns the classification.
//!
//! Failures say whether a retry can help: a model answer that is not the
//! JSON asked for is final; a target API that keeps answering 5xx after the
//! agent's own few retries is worth another run later.

wit_bindgen::generate!({ world: "agent", path: "../../wit", generate_all });

use node_runtime::agent::llm::{self, ChatRequest, Message, Role};
use node_runtime::agent::log::{self, Level};
use serde::{Deserialize, Serialize};
use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

/// The categories the model may choose, each with the department its
/// invoices go to.
const ROUTING: [(&str, &str); 6] = [
    ("Office Supplies", "Procurement Department"),
    ("Technology/Hardware", "IT Department"),
    ("Professional Services", "Finance Department"),
    ("Utilities", "Facilities Management"),
    ("Travel & Expenses", "HR Department"),
    ("Other", "General Accounts Payable"),
];

const DEFAULT_INSTRUCTIONS: &str = "You classify vendor invoices. Answer with one JSON object \
and nothing else, with the fields vendorName (string), vendorCategory (one of: Office Supplies, \
Technology/Hardware, Professional Services, Utilities, Travel & Expenses, Other), invoiceNumber \
(string), invoiceDate (string, YYYY-MM-DD), totalAmount (number), currency (ISO 4217 code), \
routingDestination (the department for the category: Office Supplies -> Procurement Department, \
Technology/Hardware -> IT Department, Professional Services -> Finance Department, Utilities -> \
Facilities Management, Travel & Expenses -> HR Department, Other -> General Accounts Payable) \
and confidence (a number from 0 to 1).";

/// Attempts at the target API before giving up on this run.
const TARGET_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Classification {
    vendor_name: String,
    vendor_category: String,
    invoice_number: String,
    invoice_date: String,
    total_amount: f64,
    currency: String,
    routing_destination: String,
    confidence: f64,
}

struct InvoiceClassifier;

fn lookup<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn fail(message: impl Into<String>, retryable: bool) -> AgentError {
    AgentError {
        message: message.into(),
        retryable,
    }
}

impl Guest for InvoiceClassifier {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let invoice = lookup(&context.input_ref, "message")
            .ok_or_else(|| fail("no invoice: input_ref[\"message\"] is missing", false))?;
        serde_json::from_str::<serde_json::Value>(invoice)
            .map_err(|err| fail(format!("the invoice is not JSON: {err}"), false))?;
        let instructions = lookup(&context.metadata, "instructions").unwrap_or(DEFAULT_INSTRUCTIONS);

        let answer = llm::chat(&ChatRequest {
            model: None,
            messages: vec![
                Message {
                    role: Role::System,
                    content: instructions.to_string(),
                },
                Message {
                    role: Role::User,
                    content: invoice.to_string(),
                },
            ],
            max_tokens: Some(400),
            temperature: Some(0.0),
        })
        .map_err(|error| match error {
            llm::LlmError::Timeout(m) | llm::LlmError::Provider(m) => fail(format!("the LLM failed: {m}"), true),
            other => fail(format!("the LLM refused: {other:?}"), false),
        })?;
        let classification = parse(&answer.content)?;
        log::log(
            Level::Info,
            "invoice classified",
            &[
                ("category".to_string(), classification.vendor_category.clone()),
                ("confidence".to_string(), classification.confidence.to_string()),
            ],
        );

        if let Some(target) = lookup(&context.metadata, "target_url") {
            let message_id = lookup(&context.input_ref, "messageId").unwrap_or(&classification.invoice_number);
            let key = format!("{}-{}", context.run_id, message_id);
            let body = serde_json::to_vec(&classification).expect("a classification serialises");
            post_with_retries(target, &key, &body)?;
        }

        Ok(vec![
            ("vendorName".into(), classification.vendor_name),
            ("vendorCategory".into(), classification.vendor_category),
            ("invoiceNumber".into(), classification.invoice_number),
            ("invoiceDate".into(), classification.invoice_date),
            ("totalAmount".into(), classification.total_amount.to_string()),
            ("currency".into(), classification.currency),
            ("routingDestination".into(), classification.routing_destination),
            ("confidence".into(), classification.confidence.to_string()),
            ("tokensIn".into(), answer.usage.tokens_in.to_string()),
            ("tokensOut".into(), answer.usage.tokens_out.to_string()),
        ])
    }
}

/// The model's answer as a checked classification; any deviation is a
/// final error, since asking the same model the same thing again is
/// unlikely to help.
fn parse(content: &str) -> Result<Classification, AgentError> {
    // Models like to wrap JSON in a Markdown fence.
    let trimmed = content
        .trim()
        .trim_start_matches("```json")
        .trim_start_matches("```")
        .trim_end_matches("```")
        .trim();
    let classification: Classification = serde_json::from_str(trimmed).map_err(|err| {
        let shown: String = content.chars().take(200).collect();
        fail(
            format!("the model's answer is not the classification asked for ({err}): {shown}"),
            false,
        )
    })?;
    let Some((_, department)) = ROUTING
        .iter()
        .find(|(category, _)| *category == classification.vendor_category)
    else {
        return Err(fail(
            format!(
                "the model chose an unknown category {:?}",
                classification.vendor_category
            ),
            false,
        ));
    };
    if classification.routing_destination != *department {
        return Err(fail(
            format!(
                "the model routed {:?} to {:?}; it goes to {department:?}",
                classification.vendor_category, classification.routing_destination
            ),
            false,
        ));
    }
    if !(0.0..=1.0).contains(&classification.confidence) {
        return Err(fail(
            format!("the model's confidence {} is outside 0..1", classification.confidence),
            false,
        ));
    }
    Ok(classification)
}

/// POSTs to the target API, retrying a 5xx or a transport error a few
/// times; a 4xx is final.
fn post_with_retries(url: &str, idempotency_key: &str, body: &[u8]) -> Result<(), AgentError> {
    let mut last = String::new();
    for attempt in 1..=TARGET_ATTEMPTS {
        match post(url, idempotency_key, body) {
            Ok(status) if (200..300).contains(&status) => return Ok(()),
            Ok(status) if status >= 500 => last = format!("the target API answered {status}"),
            Ok(status) => {
                return Err(fail(format!("the target API refused the invoice with {status}"), false));
            }
            Err(error) => last = error,
        }
        if attempt < TARGET_ATTEMPTS {
            std::thread::sleep(std::time::Duration::from_millis(100 << attempt));
        }
    }
    Err(fail(format!("{last} after {TARGET_ATTEMPTS} attempts"), true))
}

/// One POST; the HTTP status, or why there was none.
fn post(url: &str, idempotency_key: &str, body: &[u8]) -> Result<u16, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(format!("target_url {url:?} is not an http:// or https:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let headers = Fields::from_list(&[
        ("content-type".to_string(), b"application/json".to_vec()),
        ("idempotency-key".to_string(), idempotency_key.as_bytes().to_vec()),
    ])
    .map_err(|err| format!("bad header: {err:?}"))?;
    let request = OutgoingRequest::new(headers);
    let _ = request.set_method(&Method::Post);
    let _ = request.set_scheme(Some(&scheme));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(path));
    let outgoing = request
        .body()
        .map_err(|()| "the request body was already taken".to_string())?;
    let pending = outgoing_handler::handle(request, None).map_err(|code| format!("{code:?}"))?;
    {
        let stream = outgoing.write().map_err(|()| "cannot write the body".to_string())?;
        // blocking_write_and_flush takes at most 4096 bytes at a time.
        for chunk in body.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|err| format!("writing the body: {err:?}"))?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|code| format!("{code:?}"))?;
    pending.subscribe().block();
    match pending.get() {
        Some(Ok(Ok(response))) => Ok(response.status()),
        Some(Ok(Err(code))) => Err(format!("{code:?}")),
        _ => Err("no response".to_string()),
    }
}

export!(InvoiceClassifier);

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(category: &str, destination: &str, confidence: f64) -> String {
        format!(
            r#"{{"vendorName":"Acme","vendorCategory":"{category}","invoiceNumber":"INV-1",
               "invoiceDate":"2026-11-01","totalAmount":12.5,"currency":"EUR",
               "routingDestination":"{destination}","confidence":{confidence}}}"#
        )
    }

    #[test]
    fn a_well_formed_answer_is_accepted_even_in_a_fence() {
        let fenced = format!("```json\n{}\n```", answer("Utilities", "Facilities Management", 0.9));
        assert_eq!(parse(&fenced).unwrap().vendor_category, "Utilities");
    }

    #[test]
    fn unknown_categories_wrong_routes_and_bad_confidence_are_final_errors() {
        for bad in [
            answer("Snacks", "Procurement Department", 0.5),
            answer("Utilities", "IT Department", 0.5),
            answer("Utilities", "Facilities Management", 1.5),
            "not json".to_string(),
        ] {
            let error = parse(&bad).unwrap_err();
            assert!(!error.retryable, "{bad}");
        }
    }
}
