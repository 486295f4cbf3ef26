//! Log setup (human-readable or JSON lines on stderr, filtered by
//! `RUST_LOG` or the configured filter) and, when `telemetry.otlp_endpoint`
//! is set, OpenTelemetry traces of llmesh's own spans exported over
//! OTLP/HTTP. A forwarded request carries its W3C `traceparent`, so the
//! serving node's spans join the entry node's trace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat, TelemetryConfig};

/// The W3C trace-context header's name.
const TRACEPARENT: &str = "traceparent";

/// Whether spans are exported: without it, a request pays nothing for
/// trace contexts.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Keeps the trace exporter; [`Telemetry::shutdown`] sends what is left.
#[must_use = "shut it down at exit, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the trace exporter (blocking: it waits for the
    /// last batch to be sent).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(error = %err, "could not send the last spans to the OTLP receiver");
        }
    }
}

/// The exporter for `endpoint`'s `/v1/traces`. Builds a blocking HTTP
/// client: call it off the async runtime's worker threads.
fn tracer_provider(endpoint: &str, node: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let base = endpoint.trim_end_matches('/');
    let url = if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()?;
    let resource = Resource::builder()
        .with_service_name("llmesh")
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", node.to_string()))
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// Installs the global subscriber for logs only (see [`init_with_traces`]).
pub fn init(log: &LogConfig) {
    init_with_traces(log, &TelemetryConfig::default(), "").shutdown();
}

/// Installs the global subscriber: logs per `log`, and traces of the
/// `llmesh*` crates' spans when `telemetry` names a receiver (`node`
/// names this node in them). A second call installs nothing (tests start
/// several agents in one process).
pub fn init_with_traces(log: &LogConfig, telemetry: &TelemetryConfig, node: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: journald, files and pipes get
    // plain text (`NO_COLOR` turns it off anywhere).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let logs = match log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
    };
    let mut provider = None;
    let traces = telemetry.otlp_endpoint.as_deref().and_then(|endpoint| {
        // The blocking HTTP client must not be built on a runtime worker.
        match tokio::task::block_in_place(|| tracer_provider(endpoint, node)) {
            Ok(built) => {
                let tracer = built.tracer("llmesh");
                provider = Some(built);
                // Only llmesh's spans, whatever the log filter says: the
                // per-hop spans are DEBUG, so without traces they cost
                // nothing at the default log level; events up to INFO.
                let ours = filter_fn(|meta| {
                    let most = if meta.is_span() { Level::DEBUG } else { Level::INFO };
                    meta.target().starts_with("llmesh") && *meta.level() <= most
                });
                Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours))
            }
            Err(err) => {
                eprintln!("llmesh: telemetry.otlp_endpoint {endpoint:?} unusable, no traces are sent: {err}");
                None
            }
        }
    });
    let installed = tracing_subscriber::registry().with(logs.with_filter(filter)).with(traces).try_init();
    if installed.is_ok()
        && provider.is_some()
        && let Some(endpoint) = &telemetry.otlp_endpoint
    {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(%endpoint, "sending traces over OTLP/HTTP");
    }
    Telemetry { provider }
}

/// Serves forwarded requests inside a `serve_forwarded` span that continues
/// the entry node's trace.
pub struct TracedForwarded(pub std::sync::Arc<dyn llmesh_mesh::RequestHandler>);

#[async_trait::async_trait]
impl llmesh_mesh::RequestHandler for TracedForwarded {
    async fn serve(
        &self,
        req: llmesh_mesh::InferenceRequest,
    ) -> Result<llmesh_mesh::InferenceResponse, llmesh_mesh::ServeError> {
        use tracing::Instrument;
        let from = req.forwarded_by.as_deref().unwrap_or("");
        let span = tracing::debug_span!("serve_forwarded", request_id = %req.request_id, model = %req.meta.model, from = %from);
        continue_trace(&span, &req.traceparent);
        self.0.serve(req).instrument(span).await
    }
}

/// The W3C `traceparent` of `span`, to carry across a hop; empty when
/// traces are off.
pub fn traceparent(span: &tracing::Span) -> String {
    if !EXPORTING.load(Ordering::Relaxed) {
        return String::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// Makes `span` a child of the remote span `traceparent` names (the entry
/// node's, for a forwarded request); nothing when it names none.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() || !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    // Fails only when traces are off: the span then has no context to set.
    let _ = span.set_parent(parent);
}
