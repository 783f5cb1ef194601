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
//!
//! Written with the Rust SDK (`kit/rust/sdk`), on the agent world 0.2.0.

use node_runtime_agent::bindings::wasi::http::types::Method;
use node_runtime_agent::http::{self, Request};
use node_runtime_agent::llm::{self, ChatRequest, Message};
use node_runtime_agent::log::{self, Level};
use node_runtime_agent::{Context, Error, Output};
use serde::{Deserialize, Serialize};

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

fn fail(message: impl Into<String>, retryable: bool) -> Error {
    Error {
        message: message.into(),
        retryable,
    }
}

fn run(context: Context) -> Result<Output, Error> {
    let invoice = context
        .input()
        .ok_or_else(|| fail("no invoice: input_ref[\"message\"] is missing", false))?;
    serde_json::from_str::<serde_json::Value>(invoice)
        .map_err(|err| fail(format!("the invoice is not JSON: {err}"), false))?;
    let instructions = context.meta("instructions").unwrap_or(DEFAULT_INSTRUCTIONS);

    let mut request = ChatRequest::new(vec![Message::system(instructions), Message::user(invoice)]);
    request.max_tokens = Some(400);
    request.temperature = Some(0.0);
    let answer = llm::chat(&request).map_err(|error| match error {
        llm::LlmError::Timeout(m) | llm::LlmError::Provider(m) => fail(format!("the LLM failed: {m}"), true),
        other => fail(format!("the LLM refused: {other:?}"), false),
    })?;
    let classification = parse(&answer.content)?;
    log::write(
        Level::Info,
        "invoice classified",
        &[
            ("category", &classification.vendor_category),
            ("confidence", &classification.confidence.to_string()),
        ],
    );

    if let Some(target) = context.meta("target_url") {
        let message_id = context.get("messageId").unwrap_or(&classification.invoice_number);
        let key = format!("{}-{}", context.run_id, message_id);
        let body = serde_json::to_vec(&classification).expect("a classification serialises");
        post_with_retries(target, &key, &body)?;
    }

    Ok(Output::from([
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
    ]))
}

node_runtime_agent::export!(run);

/// The model's answer as a checked classification; any deviation is a
/// final error, since asking the same model the same thing again is
/// unlikely to help.
fn parse(content: &str) -> Result<Classification, Error> {
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
fn post_with_retries(url: &str, idempotency_key: &str, body: &[u8]) -> Result<(), Error> {
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
    let sent = Request::new(Method::Post, url)
        .header("content-type", "application/json")
        .header("idempotency-key", idempotency_key)
        .body(body)
        .send_with(|_| true);
    match sent {
        Ok(status) => Ok(status),
        Err(http::Error::InvalidUrl(url)) => Err(format!("target_url {url:?} is not an http:// or https:// URL")),
        // The answer came: its status is what counts.
        Err(http::Error::Body { status, .. }) => Ok(status),
        Err(error) => Err(error.to_string()),
    }
}

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
