//! OpenTelemetry traces: with `telemetry.otlp_endpoint` set, a forwarded
//! request yields one trace across both nodes, with spans for the entry,
//! the scheduling decision, the forward hop, the serving node's side and
//! the backend call, each carrying the request id. The receiver is an
//! OTLP/HTTP endpoint run by the test, decoding what arrives with the
//! OpenTelemetry protocol's own message types.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use llmesh_tests::{agent_in_env, client, data_dir, eventually, get_json, join_token, sim};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::json;

/// One span as received.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: HashMap<String, String>,
    node: String,
}

type Spans = Arc<Mutex<Vec<Received>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

async fn receive(State(spans): State<Spans>, body: Bytes) -> (axum::http::StatusCode, Vec<u8>) {
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut out = spans.lock().expect("spans");
    for resource in export.resource_spans {
        let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
        let node = attributes.iter().find(|a| a.key == "service.instance.id").map(|a| text(a.value.as_ref()));
        for scope in resource.scope_spans {
            for span in scope.spans {
                out.push(Received {
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent: span.parent_span_id,
                    attributes: span.attributes.iter().map(|a| (a.key.clone(), text(a.value.as_ref()))).collect(),
                    node: node.clone().unwrap_or_default(),
                });
            }
        }
    }
    (axum::http::StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
}

async fn otlp_receiver() -> (String, Spans) {
    let spans = Spans::default();
    let app = axum::Router::new().route("/v1/traces", post(receive)).with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

/// The client's own trace context (W3C example values).
const CLIENT_PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[tokio::test]
async fn a_forwarded_request_is_one_trace_across_both_nodes() {
    let (endpoint, spans) = otlp_receiver().await;
    let env = [("LLMESH_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str())];
    let sim_a = sim(&["--models", "qwen2.5:7b"]).await;
    let sim_b = sim(&["--models", "only-b:1b"]).await;
    let dir_a = data_dir();
    let a = agent_in_env(&dir_a, &sim_a.url, &["--name", "node-a"], &env).await;
    let token = join_token(&dir_a);
    let b_args = ["--name", "node-b", "--join", &token, "--bootstrap", &a.p2p_addr()];
    let _b = agent_in_env(&data_dir(), &sim_b.url, &b_args, &env).await;
    eventually("node-a can forward to node-b", || async {
        let listed = get_json(&format!("{}/mesh/v1/nodes", a.url)).await;
        listed["nodes"].as_array().is_some_and(|n| {
            n.iter().any(|n| n["name"] == "node-b" && n["liveness"] == "alive" && n["addresses"]["data"] != "")
        })
    })
    .await;
    let reply = client()
        .post(format!("{}/v1/chat/completions", a.url))
        .header("x-request-id", "trace-me-1")
        .header("traceparent", CLIENT_PARENT)
        .json(&json!({ "model": "only-b:1b", "max_tokens": 3, "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .expect("chat");
    assert_eq!(reply.status().as_u16(), 200);
    assert_eq!(reply.headers().get("x-llmesh-node").and_then(|v| v.to_str().ok()), Some("node-b"));
    let wanted = ["entry", "schedule", "forward", "serve_forwarded", "backend"];
    let ours = |spans: &[Received]| -> Vec<Received> {
        spans
            .iter()
            .filter(|s| s.attributes.get("request_id").map(String::as_str) == Some("trace-me-1"))
            .cloned()
            .collect()
    };
    // The batch exporter sends every few seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        let got = ours(&spans.lock().expect("spans"));
        if wanted.iter().all(|w| got.iter().any(|s| s.name == *w)) || tokio::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_name =
        |name: &str| got.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} span in {got:#?}"));
    let (entry, schedule, forward, serve, backend) =
        (by_name("entry"), by_name("schedule"), by_name("forward"), by_name("serve_forwarded"), by_name("backend"));
    assert!(got.iter().all(|s| s.trace_id == entry.trace_id), "one trace: {got:#?}");
    assert_eq!(hex(&entry.trace_id), "0af7651916cd43dd8448eb211c80319c", "the entry joins the client's trace");
    assert_eq!(hex(&entry.parent), "b7ad6b7169203331");
    assert_eq!(schedule.parent, entry.span_id, "the decision is part of the entry");
    assert_eq!(forward.parent, schedule.span_id, "the hop is part of the decision");
    assert_eq!(serve.parent, entry.span_id, "the serving node continues the entry node's trace");
    assert_eq!(backend.parent, serve.span_id);
    assert_eq!((entry.node.as_str(), serve.node.as_str(), backend.node.as_str()), ("node-a", "node-b", "node-b"));
    assert_eq!(schedule.attributes.get("node").map(String::as_str), forward.attributes.get("peer").map(String::as_str));
    assert!(schedule.attributes.contains_key("reason"), "{schedule:?}");
}
