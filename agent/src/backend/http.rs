//! The HTTP client side shared by the Ollama and OpenAI-compatible
//! backends and the cloud providers: pooled keep-alive connections,
//! timeouts, and error classes. Backends beside the agent are plain HTTP;
//! cloud providers may be HTTPS (rustls with the system's root store).
//!
//! This is the hot path of every request, so it uses hyper's pooled client
//! directly rather than reqwest: the backend is plain HTTP/1.1 beside the
//! agent, and reqwest's extra layers (redirects, cookies, proxy checks)
//! cost measurable CPU per request (see `scripts/bench/overhead`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::header::{ACCEPT, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, HeaderName};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmesh_mesh::{BodyStream, InferenceResponse, ServeError, StreamError};
use serde::de::DeserializeOwned;

use super::inline_pool::{InlineError, InlinePool};
use crate::config::BackendConfig;

/// The request id sent to the backend, so its logs match ours.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Largest inventory document accepted (model lists are a few KiB).
const MAX_INVENTORY_BYTES: usize = 16 * 1024 * 1024;

/// Whether `err` is a request lost to a pooled connection that was already
/// closing: nothing came back, and the backend never read the request (a
/// connection refused or timed out is not this: nothing was pooled).
fn is_stale_connection(err: &hyper_util::client::legacy::Error) -> bool {
    if err.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>()
            && (hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed())
        {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted);
        }
        source = cause.source();
    }
    false
}

/// A failed request, from either transport.
#[derive(Debug)]
enum SendFailure {
    Inline(InlineError),
    Pooled(hyper_util::client::legacy::Error),
}

impl SendFailure {
    fn is_connect(&self) -> bool {
        match self {
            SendFailure::Inline(err) => matches!(err, InlineError::Connect(_)),
            SendFailure::Pooled(err) => err.is_connect(),
        }
    }

    fn is_stale(&self) -> bool {
        match self {
            SendFailure::Inline(err) => err.is_stale(),
            SendFailure::Pooled(err) => is_stale_connection(err),
        }
    }
}

impl std::fmt::Display for SendFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendFailure::Inline(err) => err.fmt(f),
            SendFailure::Pooled(err) => err.fmt(f),
        }
    }
}

/// A response head with its body as a stream of chunks.
struct Answer {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: BodyStream,
}

/// The connection pool: plain HTTP for the backend beside the agent (the
/// hot path: no TLS layer, connections driven inline by the reading task),
/// HTTPS-capable for cloud providers.
enum Transport {
    Plain(Arc<InlinePool>),
    Tls(Box<TlsClients>),
}

/// The cloud side: a pooled client, and one that never pools (retries).
struct TlsClients {
    pooled: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    fresh: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Transport {
    /// Sends `request` (origin form for the plain pool, absolute for the
    /// cloud client: see [`HttpBackend::request`]); `fresh`: on a new
    /// connection, not pooled after.
    async fn request(&self, request: Request<Full<Bytes>>, fresh: bool) -> Result<Answer, SendFailure> {
        match self {
            Transport::Plain(pool) => {
                let (status, headers, body) = pool.request(request, fresh).await.map_err(SendFailure::Inline)?;
                let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
                Ok(Answer { status, headers, body: Box::pin(body) })
            }
            Transport::Tls(clients) => {
                let client = if fresh { &clients.fresh } else { &clients.pooled };
                let response = client.request(request).await.map_err(SendFailure::Pooled)?;
                let (parts, body) = response.into_parts();
                let body = body.into_data_stream().map(|chunk| chunk.map_err(|e| StreamError::Backend(e.to_string())));
                Ok(Answer { status: parts.status, headers: parts.headers, body: Box::pin(body) })
            }
        }
    }
}

/// Where an [`HttpBackend`] sends requests and how.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    /// Base URL (without `/v1`).
    pub base: String,
    /// Bearer token sent with every request.
    pub api_key: Option<String>,
    /// Extra headers sent with every request.
    pub headers: Vec<(String, String)>,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Whether `https://` URLs are allowed (cloud providers).
    pub allow_https: bool,
}

/// A pooled HTTP client bound to one backend base URL.
///
/// A pooled connection can be dead by the time a request is written on it:
/// llama-server closes every connection after a streamed response although
/// it announced keep-alive, and the close races the next request. hyper-util
/// retries only a request that failed before any byte of it was written
/// (`retry_canceled_requests`); one written onto a connection whose close
/// is already on its way fails with "connection closed before message
/// completed" or "SendRequest", and the backend never saw it. Such a
/// failure is retried once on a connection opened for it, and the backend
/// is then known to close after streams: streamed requests to it say
/// `Connection: close`, so their connections never return to the pool.
pub struct HttpBackend {
    client: Transport,
    /// The backend closed a pooled connection under a request.
    closes_after_stream: AtomicBool,
    base: String,
    authorization: Option<http::HeaderValue>,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    inventory_timeout: Duration,
}

impl HttpBackend {
    /// A client for `config.url`; only `http://` URLs (the backend runs
    /// beside the agent).
    pub fn new(config: &BackendConfig) -> Result<HttpBackend, ServeError> {
        HttpBackend::for_target(HttpTarget {
            base: config.url.clone(),
            api_key: config.api_key.clone(),
            headers: Vec::new(),
            connect_timeout: config.connect_timeout,
            allow_https: false,
        })
    }

    /// A client for any target.
    pub fn for_target(target: HttpTarget) -> Result<HttpBackend, ServeError> {
        let base = target.base.trim_end_matches('/').to_string();
        let https = base.starts_with("https://");
        if !(base.starts_with("http://") || https && target.allow_https) {
            let expected = if target.allow_https { "http:// or https://" } else { "http://" };
            return Err(ServeError::Internal(format!(
                "URL '{}' must start with {expected}{}",
                target.base,
                if target.allow_https { "" } else { " (the backend runs beside the agent)" }
            )));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(target.connect_timeout));
        // Small SSE/NDJSON chunks must not wait for Nagle.
        connector.set_nodelay(true);
        let client = if https {
            connector.enforce_http(false);
            let tls = hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .map_err(|e| ServeError::Internal(format!("cannot load the system's TLS root certificates: {e}")))?
                .https_or_http()
                .enable_http1()
                .wrap_connector(connector);
            let pooled =
                Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(tls.clone());
            let fresh = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(tls);
            Transport::Tls(Box::new(TlsClients { pooled, fresh }))
        } else {
            Transport::Plain(InlinePool::new(&base, target.connect_timeout).map_err(ServeError::Internal)?)
        };
        let mut headers = Vec::new();
        for (name, value) in &target.headers {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| ServeError::Internal(format!("bad header name '{name}': {e}")))?;
            let value = http::HeaderValue::from_str(value)
                .map_err(|e| ServeError::Internal(format!("bad value for header '{name}': {e}")))?;
            headers.push((name, value));
        }
        let authorization = match &target.api_key {
            Some(key) => {
                let mut value = http::HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    ServeError::Internal(format!(
                        "the API key for {base} holds characters an HTTP header cannot carry (control characters or line breaks); check the key"
                    ))
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(HttpBackend {
            client,
            closes_after_stream: AtomicBool::new(false),
            base,
            authorization,
            headers,
            inventory_timeout: target.connect_timeout + Duration::from_secs(5),
        })
    }

    /// The backend's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request for `path` with the headers every request carries. The
    /// plain pool gets the origin form and a `Host` header built once (this
    /// runs for every request: no URL formatting and parsing twice); the
    /// cloud client gets the absolute URL it connects by.
    fn request(&self, method: Method, path: &str, body: Bytes) -> Result<Request<Full<Bytes>>, ServeError> {
        let bad = |e: http::uri::InvalidUri| ServeError::Internal(format!("bad backend request path {path}: {e}"));
        let (uri, host) = match &self.client {
            Transport::Plain(pool) => (pool.origin_form(path).map_err(bad)?, Some(pool.host())),
            Transport::Tls(_) => (http::Uri::try_from(self.url(path)).map_err(bad)?, None),
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        if let Some(host) = host {
            headers.insert(HOST, host.clone());
        }
        if let Some(auth) = &self.authorization {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        headers.insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        Ok(request)
    }

    fn classify(&self, path: &str, err: &SendFailure) -> ServeError {
        let what = self.url(path);
        if err.is_connect() {
            ServeError::BackendUnreachable(format!("cannot connect to {what}"))
        } else {
            ServeError::BackendUnreachable(format!("{what}: {err}"))
        }
    }

    /// Sends `body` to `path` and returns once the response head arrives;
    /// the caller bounds how long that may take. `stream`: the response
    /// streams (a backend that closes after streams closes after this one).
    pub async fn post(
        &self,
        path: &str,
        body: Bytes,
        request_id: &str,
        stream: bool,
    ) -> Result<InferenceResponse, ServeError> {
        self.send(Method::POST, path, body, request_id, stream).await
    }

    /// Sends a request with a body (`DELETE /api/delete` has one too) and
    /// returns once the response head arrives.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        request_id: &str,
        stream: bool,
    ) -> Result<InferenceResponse, ServeError> {
        let build = || -> Result<Request<Full<Bytes>>, ServeError> {
            let mut request = self.request(method.clone(), path, body.clone())?;
            if let Ok(id) = http::HeaderValue::from_str(request_id) {
                request.headers_mut().insert(X_REQUEST_ID, id);
            }
            if stream && self.closes_after_stream.load(Ordering::Relaxed) {
                request.headers_mut().insert(CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok(request)
        };
        let response = match self.client.request(build()?, false).await {
            Ok(response) => response,
            Err(err) if err.is_stale() => {
                if !self.closes_after_stream.swap(true, Ordering::Relaxed) {
                    tracing::info!(backend = %self.base, "the backend closes connections after streamed responses; streamed requests will not reuse them");
                }
                tracing::debug!(backend = %self.base, error = %err, "a pooled connection was dead; retrying on a new one");
                self.client.request(build()?, true).await.map_err(|e| self.classify(path, &e))?
            }
            Err(err) => return Err(self.classify(path, &err)),
        };
        let content_type =
            response.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_string();
        Ok(InferenceResponse { status: response.status.as_u16(), content_type, body: response.body })
    }

    /// Asks `path` on a new connection and reads the answer's head: a
    /// liveness probe. Not pooled: a pooled connection can sit behind a
    /// busy one, and a new connection proves the server still accepts and
    /// answers.
    pub async fn probe(&self, path: &str) -> Result<(), ServeError> {
        let request = self.request(Method::GET, path, Bytes::new())?;
        let response = self.client.request(request, true).await.map_err(|e| self.classify(path, &e))?;
        if response.status.is_server_error() {
            return Err(ServeError::BackendUnavailable(format!("{} answered {}", self.url(path), response.status)));
        }
        Ok(())
    }

    /// Fetches and decodes a JSON document (inventory endpoints).
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ServeError> {
        let mut request = self.request(Method::GET, path, Bytes::new())?;
        request.headers_mut().insert(ACCEPT, http::HeaderValue::from_static("application/json"));
        let fetch = async {
            let response = self.client.request(request, false).await.map_err(|e| self.classify(path, &e))?;
            let status = response.status;
            if !status.is_success() {
                return Err(ServeError::BackendUnavailable(format!("{} answered {status}", self.url(path))));
            }
            let mut body = response.body;
            let mut buffer = BytesMut::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ServeError::BackendUnreachable(format!("{}: {e}", self.url(path))))?;
                if buffer.len() + chunk.len() > MAX_INVENTORY_BYTES {
                    return Err(ServeError::BackendUnavailable(format!("{} sent an oversized body", self.url(path))));
                }
                buffer.extend_from_slice(&chunk);
            }
            Ok(buffer.freeze())
        };
        let bytes = tokio::time::timeout(self.inventory_timeout, fetch).await.map_err(|_| {
            ServeError::Timeout(format!("{} did not answer within {:?}", self.url(path), self.inventory_timeout))
        })??;
        serde_json::from_slice(&bytes)
            .map_err(|e| ServeError::BackendUnavailable(format!("{} sent an unexpected body: {e}", self.url(path))))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    /// A backend that answers every request with its target and headers,
    /// one `name: value` per line after the target.
    async fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|request: http::Request<Incoming>| async move {
                    let mut text = format!("{} {}\n", request.method(), request.uri());
                    for (name, value) in request.headers() {
                        text.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
                    }
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        address.to_string()
    }

    async fn body_text(response: InferenceResponse) -> String {
        let mut body = response.body;
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            text.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("utf-8"));
        }
        text
    }

    fn target(base: String, api_key: Option<&str>) -> HttpTarget {
        HttpTarget {
            base,
            api_key: api_key.map(str::to_string),
            headers: vec![("x-extra".into(), "yes".into())],
            connect_timeout: Duration::from_secs(2),
            allow_https: false,
        }
    }

    #[tokio::test]
    async fn requests_carry_the_base_path_host_and_configured_headers() {
        let address = echo_server().await;
        let backend =
            HttpBackend::for_target(target(format!("http://{address}/under/here/"), Some("k1"))).expect("backend");
        let response =
            backend.post("/v1/chat/completions", Bytes::from_static(b"{}"), "req-7", false).await.expect("answered");
        let text = body_text(response).await;
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("POST /under/here/v1/chat/completions"), "{text}");
        let headers: Vec<&str> = lines.collect();
        for expected in [
            format!("host: {address}"),
            "authorization: Bearer k1".into(),
            "x-request-id: req-7".into(),
            "x-extra: yes".into(),
            "content-type: application/json".into(),
        ] {
            assert!(headers.contains(&expected.as_str()), "missing {expected:?} in {headers:?}");
        }

        let bare = HttpBackend::for_target(target(format!("http://{address}"), None)).expect("backend");
        let text =
            body_text(bare.post("/api/chat", Bytes::from_static(b"{}"), "r", false).await.expect("answered")).await;
        assert!(text.starts_with("POST /api/chat\n"), "{text}");
        assert!(!text.contains("authorization"), "{text}");
    }

    #[test]
    fn an_api_key_a_header_cannot_carry_is_refused_at_start() {
        let Err(err) = HttpBackend::for_target(target("http://127.0.0.1:9".into(), Some("bad\nkey"))) else {
            panic!("a key with a line break was accepted");
        };
        assert!(err.to_string().contains("API key"), "{err}");
    }
}
