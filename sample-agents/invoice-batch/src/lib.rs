//! Invoice-batch agent: the computing half of the invoice classifier,
//! without its waits, as a fixed workload for `bench metering`.
//!
//! Where the classifier spends its CPU is JSON and strings: parsing the
//! invoice, building the prompt, parsing and checking the model's answer,
//! and serialising what it files. This agent does that for `invoices`
//! made-up invoices (input-ref, default 2,000), deterministically and with
//! no host call: renders each as JSON, parses it back, normalises the
//! vendor name, picks a category from keywords in its line items, builds
//! the prompt text, renders and re-parses a model-style answer and checks
//! it field by field, and serialises the record it would file. Returns
//! `invoices`, `checksum` (of everything it produced, so no step can be
//! optimised away) and `bytes` (JSON produced and parsed).

wit_bindgen::generate!({ world: "agent", path: "../../wit", generate_all });

use serde::{Deserialize, Serialize};

const VENDORS: [&str; 8] = [
    "  Acme   Office Supplies, Inc. ",
    "Northwind Traders",
    "CONTOSO  hardware ltd",
    "Globex Consulting Group",
    "City Water & Power",
    "Blue Sky Travel GmbH",
    "Initech   Software",
    "Umbrella Facilities",
];

const ITEMS: [&str; 10] = [
    "Printer paper A4, 10 reams",
    "Laptop docking station",
    "Consulting hours, March",
    "Electricity, meter 4471",
    "Flight BER-LIS, economy",
    "Toner cartridge black",
    "Server rack rail kit",
    "Legal review of contract",
    "Hotel, 3 nights",
    "Water supply, quarterly",
];

/// Keywords that choose a category, as a rule-based pre-classifier would.
const KEYWORDS: [(&str, &str); 12] = [
    ("paper", "Office Supplies"),
    ("toner", "Office Supplies"),
    ("laptop", "Technology/Hardware"),
    ("server", "Technology/Hardware"),
    ("docking", "Technology/Hardware"),
    ("consulting", "Professional Services"),
    ("legal", "Professional Services"),
    ("electricity", "Utilities"),
    ("water", "Utilities"),
    ("flight", "Travel & Expenses"),
    ("hotel", "Travel & Expenses"),
    ("rack", "Technology/Hardware"),
];

const ROUTING: [(&str, &str); 6] = [
    ("Office Supplies", "Procurement Department"),
    ("Technology/Hardware", "IT Department"),
    ("Professional Services", "Finance Department"),
    ("Utilities", "Facilities Management"),
    ("Travel & Expenses", "HR Department"),
    ("Other", "General Accounts Payable"),
];

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LineItem {
    description: String,
    quantity: u32,
    unit_price: f64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Invoice {
    message_id: String,
    vendor: String,
    invoice_number: String,
    invoice_date: String,
    currency: String,
    notes: String,
    lines: Vec<LineItem>,
}

#[derive(Serialize, Deserialize, PartialEq)]
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

/// A small deterministic generator, so every run does the same work.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.next() as usize % from.len()]
    }
}

fn invoice(n: usize, rng: &mut Lcg) -> Invoice {
    let lines = (0..1 + rng.next() % 6)
        .map(|_| LineItem {
            description: rng.pick(&ITEMS).to_string(),
            quantity: 1 + (rng.next() % 20) as u32,
            unit_price: (rng.next() % 100_000) as f64 / 100.0,
        })
        .collect();
    Invoice {
        message_id: format!("msg-{n:06}"),
        vendor: rng.pick(&VENDORS).to_string(),
        invoice_number: format!("INV-{}-{:05}", 2026, rng.next() % 100_000),
        invoice_date: format!("2026-{:02}-{:02}", 1 + rng.next() % 12, 1 + rng.next() % 28),
        currency: ["EUR", "USD", "GBP"][rng.next() as usize % 3].to_string(),
        notes: "Payment due within 30 days. Please quote the invoice number. \u{00e9}\u{00fc}\u{00df}".repeat(2),
        lines,
    }
}

/// Trimmed, single-spaced, in title case.
fn normalise(vendor: &str) -> String {
    vendor
        .split_whitespace()
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars.flat_map(char::to_lowercase)).collect(),
                None => String::new(),
            }
        })
        .collect::<Vec<String>>()
        .join(" ")
}

fn category(invoice: &Invoice) -> &'static str {
    let text = invoice
        .lines
        .iter()
        .map(|line| line.description.to_lowercase())
        .collect::<Vec<_>>()
        .join(" ");
    KEYWORDS
        .iter()
        .find(|(word, _)| text.contains(word))
        .map_or("Other", |(_, category)| category)
}

fn checksum(sum: u64, text: &str) -> u64 {
    text.bytes()
        .fold(sum, |sum, byte| sum.wrapping_mul(31).wrapping_add(byte as u64))
}

fn fail(message: String) -> AgentError {
    AgentError {
        message,
        retryable: false,
    }
}

struct InvoiceBatch;

impl Guest for InvoiceBatch {
    fn run(context: RunContext) -> Result<StringMap, AgentError> {
        let count: usize = match context.input_ref.iter().find(|(k, _)| k == "invoices") {
            None => 2_000,
            Some((_, value)) => value
                .trim()
                .parse()
                .map_err(|_| fail(format!("input-ref invoices must be a whole number, got {value:?}")))?,
        };
        let mut rng = Lcg(42);
        let (mut sum, mut bytes) = (0u64, 0usize);
        for n in 0..count {
            // The invoice as it arrives, and as the agent reads it.
            let text = serde_json::to_string(&invoice(n, &mut rng)).map_err(|e| fail(e.to_string()))?;
            let parsed: Invoice = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
            let vendor = normalise(&parsed.vendor);
            let category = category(&parsed);
            let total: f64 = parsed.lines.iter().map(|l| l.quantity as f64 * l.unit_price).sum();
            let prompt = format!(
                "Classify this invoice from {vendor} ({} lines, total {total:.2} {}):\n{text}",
                parsed.lines.len(),
                parsed.currency
            );
            // The model's answer, parsed and checked as the classifier does.
            let routing = ROUTING.iter().find(|(c, _)| *c == category).map_or("", |(_, r)| r);
            let answer = serde_json::json!({
                "vendorName": vendor, "vendorCategory": category,
                "invoiceNumber": parsed.invoice_number, "invoiceDate": parsed.invoice_date,
                "totalAmount": total, "currency": parsed.currency,
                "routingDestination": routing, "confidence": 0.93,
            })
            .to_string();
            let checked: Classification = serde_json::from_str(&answer).map_err(|e| fail(e.to_string()))?;
            if checked.routing_destination != routing || checked.invoice_date.len() != 10 {
                return Err(fail(format!("answer {answer} does not check")));
            }
            let filed = serde_json::to_string(&checked).map_err(|e| fail(e.to_string()))?;
            bytes += text.len() + prompt.len() + answer.len() + filed.len();
            sum = checksum(checksum(sum, &prompt), &filed);
        }
        Ok(vec![
            ("invoices".to_string(), count.to_string()),
            ("checksum".to_string(), sum.to_string()),
            ("bytes".to_string(), bytes.to_string()),
        ])
    }
}

export!(InvoiceBatch);
