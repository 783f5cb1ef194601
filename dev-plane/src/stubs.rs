//! Stand-ins for the outside world, for `node-runtime dev --demo` only: a
//! deterministic OpenAI-compatible "model" that classifies invoices by a
//! few vendor keywords, and a target API that accepts and counts what
//! agents post. They let the demo show the LLM and HTTP capabilities
//! end to end on a machine with no model and no network; nothing else
//! uses them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;

/// The model name the stub answers as.
pub const STUB_MODEL: &str = "stub-invoice-model";

/// Keyword in the vendor name -> (category, department).
const RULES: [(&str, &str, &str); 5] = [
    ("paper", "Office Supplies", "Procurement Department"),
    ("server", "Technology/Hardware", "IT Department"),
    ("consult", "Professional Services", "Finance Department"),
    ("water", "Utilities", "Facilities Management"),
    ("air", "Travel & Expenses", "HR Department"),
];

/// Serves the stub model on a free loopback port; returns its base URL.
pub async fn start_stub_model() -> std::io::Result<String> {
    let app = axum::Router::new().route("/v1/chat/completions", post(complete));
    serve(app).await.map(|addr| format!("http://{addr}"))
}

async fn complete(Json(body): Json<serde_json::Value>) -> Json<serde_json::Value> {
    let invoice: serde_json::Value = body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default();
    let vendor = invoice["vendor"].as_str().unwrap_or("Unknown vendor");
    let lower = vendor.to_lowercase();
    let (category, route) = RULES
        .iter()
        .find(|(keyword, ..)| lower.contains(keyword))
        .map_or(("Other", "General Accounts Payable"), |(_, c, r)| (*c, *r));
    let answer = serde_json::json!({
        "vendorName": vendor,
        "vendorCategory": category,
        "invoiceNumber": invoice["number"].as_str().unwrap_or("unknown"),
        "invoiceDate": invoice["date"].as_str().unwrap_or("2026-11-01"),
        "totalAmount": invoice["amount"].as_f64().unwrap_or(0.0),
        "currency": invoice["currency"].as_str().unwrap_or("EUR"),
        "routingDestination": route,
        "confidence": 0.9,
    });
    // Usage as a real provider reports it: about four characters a token.
    let prompt_chars: usize = body["messages"]
        .as_array()
        .map(|m| m.iter().map(|m| m["content"].as_str().map_or(0, str::len)).sum())
        .unwrap_or(0);
    let prompt_tokens = (prompt_chars / 4).max(1);
    let completion_tokens = (answer.to_string().len() / 4).max(1);
    Json(serde_json::json!({
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": STUB_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.to_string()}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }))
}

/// A target API that accepts every POST to `/invoices` and counts them.
pub struct StubTarget {
    pub addr: SocketAddr,
    received: Arc<AtomicU64>,
}

impl StubTarget {
    pub async fn start() -> std::io::Result<StubTarget> {
        let received = Arc::new(AtomicU64::new(0));
        let app = axum::Router::new()
            .route("/invoices", post(accept))
            .with_state(received.clone());
        let addr = serve(app).await?;
        Ok(StubTarget { addr, received })
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

async fn accept(State(received): State<Arc<AtomicU64>>) -> StatusCode {
    received.fetch_add(1, Ordering::Relaxed);
    StatusCode::CREATED
}

async fn serve(app: axum::Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}
