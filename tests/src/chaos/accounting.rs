//! Gives every request exactly one outcome and counts them.
//!
//! A request is *complete* when its response is whole: a 200 whose
//! completion has exactly the tokens asked for, one finish, one `[DONE]`.
//! It is a *clean error* when the mesh said it failed: an HTTP error with an
//! OpenAI-style error body, or a stream that ends with an error event.
//! Everything else breaks a promise: no outcome before the client's
//! deadline (*hung*), a stream or body that stops without an error
//! (*truncated*), more than one completion in one response (*duplicated*),
//! or a body that is neither a response nor an error (*malformed*).
//!
//! A transport failure (refused, reset, cut mid-body) is the client's own
//! node going away, and no server can send an error from a killed process:
//! it counts as *entry down* when the harness took that node down during
//! the request, and as *connection lost* (a broken promise) otherwise.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use serde_json::Value;

/// What a request ended with, from what the client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A whole response.
    Complete,
    /// The mesh reported a failure: HTTP status and error code, or
    /// `stream_interrupted` for an error event mid-stream.
    CleanError(String),
    /// The connection failed (refused, reset, cut mid-body); resolved into
    /// entry down or connection lost by [`Tally::add`].
    Transport(String),
    /// Nothing came back before the client's deadline.
    Hung,
    /// The body stopped early without saying it failed.
    Truncated(String),
    /// More than one completion in one response.
    Duplicated(String),
    /// Neither a response nor an error.
    Malformed(String),
}

/// Tokens in a sim completion (the sim's tokens are words).
fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

/// Classifies a finished non-streaming response.
pub fn classify_document(status: u16, body: &[u8], max_tokens: usize) -> Outcome {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return if status == 200 {
            Outcome::Truncated(format!("200 body is not JSON ({} bytes)", body.len()))
        } else {
            Outcome::Malformed(format!("{status} with a body that is not JSON"))
        };
    };
    if status != 200 {
        return error_of(status, &value);
    }
    let Some(choices) = value.get("choices").and_then(Value::as_array) else {
        return Outcome::Malformed("200 without choices".into());
    };
    if choices.len() != 1 {
        return Outcome::Duplicated(format!("{} choices", choices.len()));
    }
    let content = choices[0].pointer("/message/content").and_then(Value::as_str).unwrap_or_default();
    match words(content) {
        n if n == max_tokens => Outcome::Complete,
        n if n > max_tokens => Outcome::Duplicated(format!("{n} tokens for max_tokens {max_tokens}")),
        n => Outcome::Truncated(format!("{n} of {max_tokens} tokens")),
    }
}

/// An error response: clean when it has the OpenAI error shape.
fn error_of(status: u16, value: &Value) -> Outcome {
    match value.pointer("/error/message").and_then(Value::as_str) {
        Some(message) if !message.is_empty() => {
            let code = value.pointer("/error/code").and_then(Value::as_str).unwrap_or("error");
            Outcome::CleanError(format!("{status} {code}"))
        }
        _ => Outcome::Malformed(format!("{status} without an OpenAI error body")),
    }
}

/// Classifies a streamed (SSE) response: `body` is everything received,
/// `cut` says whether the transport failed before the body ended.
pub fn classify_stream(status: u16, body: &[u8], cut: Option<String>, max_tokens: usize) -> Outcome {
    if status != 200 {
        return match serde_json::from_slice::<Value>(body) {
            Ok(value) => error_of(status, &value),
            Err(_) => Outcome::Malformed(format!("{status} with a body that is not JSON")),
        };
    }
    let text = String::from_utf8_lossy(body);
    let mut content = String::new();
    let (mut done, mut finishes, mut error) = (0, 0, None);
    let mut ids = std::collections::BTreeSet::new();
    for event in text.split("\n\n") {
        let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
        if data == "[DONE]" {
            done += 1;
            continue;
        }
        if done > 0 {
            return Outcome::Duplicated("events after [DONE]".into());
        }
        let Ok(value) = serde_json::from_str::<Value>(data) else {
            return Outcome::Malformed(format!("an SSE event that is not JSON: {data:.80}"));
        };
        if value.get("error").is_some() {
            error = Some(value.pointer("/error/code").and_then(Value::as_str).unwrap_or("error").to_string());
            continue;
        }
        if let Some(id) = value.get("id").and_then(Value::as_str) {
            ids.insert(id.to_string());
        }
        for choice in value.get("choices").and_then(Value::as_array).into_iter().flatten() {
            if let Some(piece) = choice.pointer("/delta/content").and_then(Value::as_str) {
                content.push_str(piece);
            }
            if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
                finishes += 1;
            }
        }
    }
    let n = words(&content);
    if n > max_tokens || done > 1 || finishes > 1 || ids.len() > 1 {
        return Outcome::Duplicated(format!(
            "{n} tokens for max_tokens {max_tokens}, {done} [DONE], {finishes} finishes, {} ids",
            ids.len()
        ));
    }
    if let Some(code) = error {
        return Outcome::CleanError(format!("200 {code}"));
    }
    if let Some(cut) = cut {
        return Outcome::Transport(format!("cut mid-stream after {n} tokens: {cut}"));
    }
    if done == 1 && finishes == 1 && n == max_tokens {
        Outcome::Complete
    } else {
        Outcome::Truncated(format!("{n} of {max_tokens} tokens, {done} [DONE], {finishes} finishes"))
    }
}

/// One request as the load generator saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Which host the client sent it to.
    pub entry: usize,
    /// Whether it asked for a stream.
    pub stream: bool,
    /// When it was sent.
    pub start: Instant,
    /// When its outcome was known.
    pub end: Instant,
    /// The outcome.
    pub outcome: Outcome,
    /// `x-llmesh-node` of the response: the node that served it.
    pub served_by: Option<String>,
    /// Whether the entry node forwarded it to a peer (`x-llmesh-route`).
    pub forwarded: bool,
}

/// When the harness had each host's agent down (killed, stopped or not yet
/// started), to tell a client's lost node from a broken promise.
#[derive(Debug, Default, Clone)]
pub struct Downtime {
    spans: BTreeMap<usize, Vec<(Instant, Option<Instant>)>>,
}

impl Downtime {
    /// Host `i` goes down now (called before the signal is sent).
    pub fn down(&mut self, i: usize) {
        self.spans.entry(i).or_default().push((Instant::now(), None));
    }

    /// Host `i` is up again (called once it listens).
    pub fn up(&mut self, i: usize) {
        if let Some(last) = self.spans.get_mut(&i).and_then(|s| s.last_mut())
            && last.1.is_none()
        {
            last.1 = Some(Instant::now());
        }
    }

    /// Whether host `i` was down at some moment in `[from, to]`.
    pub fn overlaps(&self, i: usize, from: Instant, to: Instant) -> bool {
        self.spans
            .get(&i)
            .is_some_and(|spans| spans.iter().any(|(down, up)| *down <= to && up.is_none_or(|u| u >= from)))
    }
}

/// Counts outcomes and keeps examples of each broken promise.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests the load generator started.
    pub sent: u64,
    /// Complete responses.
    pub complete: u64,
    /// Clean errors by status and code.
    pub clean_errors: BTreeMap<String, u64>,
    /// Transport failures while the entry node was down.
    pub entry_down: u64,
    /// Transport failures while the entry node was up.
    pub connection_lost: u64,
    /// No outcome before the deadline.
    pub hung: u64,
    /// Stopped early without an error.
    pub truncated: u64,
    /// More than one completion.
    pub duplicated: u64,
    /// Neither a response nor an error.
    pub malformed: u64,
    /// Complete responses per serving node.
    pub served_by: BTreeMap<String, u64>,
    /// Complete responses per entry host.
    pub by_entry: BTreeMap<usize, u64>,
    /// Complete responses that crossed the data plane.
    pub forwarded: u64,
    /// Time to the whole response of every complete request, ms.
    pub latencies_ms: Vec<f64>,
    /// Up to a few examples of every broken promise.
    pub examples: Vec<String>,
}

impl Tally {
    /// Adds one request's outcome.
    pub fn add(&mut self, record: &Record, downtime: &Downtime) {
        let broken = |what: &str, detail: &str| {
            let kind = if record.stream { "stream" } else { "document" };
            format!("{what} (entry host {}, {kind}): {detail}", record.entry)
        };
        let example = match &record.outcome {
            Outcome::Complete => {
                self.complete += 1;
                *self.by_entry.entry(record.entry).or_default() += 1;
                self.forwarded += u64::from(record.forwarded);
                self.latencies_ms.push(record.end.duration_since(record.start).as_secs_f64() * 1000.0);
                if let Some(node) = &record.served_by {
                    *self.served_by.entry(node.clone()).or_default() += 1;
                }
                None
            }
            Outcome::CleanError(code) => {
                *self.clean_errors.entry(code.clone()).or_default() += 1;
                None
            }
            Outcome::Transport(detail) => {
                // A second of slack: a kill is logged just before the signal
                // and a reset may be reported a moment after the restart.
                let slack = std::time::Duration::from_secs(1);
                let from = record.start.checked_sub(slack).unwrap_or(record.start);
                if downtime.overlaps(record.entry, from, record.end + slack) {
                    self.entry_down += 1;
                    None
                } else {
                    self.connection_lost += 1;
                    Some(broken("connection lost", detail))
                }
            }
            Outcome::Hung => {
                self.hung += 1;
                Some(broken("hung", "no outcome before the client's deadline"))
            }
            Outcome::Truncated(detail) => {
                self.truncated += 1;
                Some(broken("truncated", detail))
            }
            Outcome::Duplicated(detail) => {
                self.duplicated += 1;
                Some(broken("duplicated", detail))
            }
            Outcome::Malformed(detail) => {
                self.malformed += 1;
                Some(broken("malformed", detail))
            }
        };
        if let Some(example) = example
            && self.examples.len() < 12
        {
            self.examples.push(example);
        }
    }

    /// Requests with an outcome.
    pub fn accounted(&self) -> u64 {
        self.complete
            + self.clean_errors.values().sum::<u64>()
            + self.entry_down
            + self.connection_lost
            + self.hung
            + self.truncated
            + self.duplicated
            + self.malformed
    }

    /// Whether every promise held: each request has exactly one outcome and
    /// none is hung, truncated, duplicated, malformed or lost unexplained.
    pub fn holds(&self) -> bool {
        self.accounted() == self.sent
            && self.hung + self.truncated + self.duplicated + self.malformed + self.connection_lost == 0
    }

    /// The accounting table.
    pub fn table(&self) -> String {
        let pct = |n: u64| if self.sent == 0 { 0.0 } else { 100.0 * n as f64 / self.sent as f64 };
        let errors: u64 = self.clean_errors.values().sum();
        let mut out = String::new();
        let _ = writeln!(out, "  requests sent        {:>7}", self.sent);
        let _ = writeln!(out, "  with one outcome     {:>7}", self.accounted());
        let _ = writeln!(
            out,
            "  complete             {:>7}  ({:.1}%; {} forwarded to a peer)",
            self.complete,
            pct(self.complete),
            self.forwarded
        );
        let detail = self.clean_errors.iter().map(|(k, v)| format!("{k} x{v}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(out, "  clean errors         {errors:>7}  {detail}");
        let _ = writeln!(
            out,
            "  entry node down      {:>7}  (the client's own node was killed or stopped)",
            self.entry_down
        );
        let _ = writeln!(out, "  hung                 {:>7}", self.hung);
        let _ = writeln!(out, "  truncated, no error  {:>7}", self.truncated);
        let _ = writeln!(out, "  duplicated           {:>7}", self.duplicated);
        let _ = writeln!(out, "  malformed            {:>7}", self.malformed);
        let _ = writeln!(out, "  connection lost      {:>7}  (while the entry node was up)", self.connection_lost);
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted.get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1))).copied();
        if let (Some(p50), Some(p99), Some(max)) = (at(0.5), at(0.99), sorted.last()) {
            let _ = writeln!(out, "  complete latency     p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms");
        }
        let served = self.served_by.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(out, "  served by            {served}");
        for example in &self.examples {
            let _ = writeln!(out, "  ! {example}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(events: &[&str]) -> Vec<u8> {
        events.iter().map(|e| format!("data: {e}\n\n")).collect::<String>().into_bytes()
    }

    fn chunk(id: &str, content: &str, finish: Option<&str>) -> String {
        serde_json::json!({"id": id, "choices": [{"delta": {"content": content}, "finish_reason": finish}]}).to_string()
    }

    #[test]
    fn a_whole_stream_is_complete() {
        let body =
            sse(&[&chunk("a", "one", None), &chunk("a", " two", None), &chunk("a", "", Some("length")), "[DONE]"]);
        assert_eq!(classify_stream(200, &body, None, 2), Outcome::Complete);
    }

    #[test]
    fn a_stream_without_done_or_short_is_truncated() {
        let body = sse(&[&chunk("a", "one", None), &chunk("a", " two", None)]);
        assert!(matches!(classify_stream(200, &body, None, 2), Outcome::Truncated(_)));
        let body = sse(&[&chunk("a", "one", Some("length")), "[DONE]"]);
        assert!(matches!(classify_stream(200, &body, None, 2), Outcome::Truncated(_)));
    }

    #[test]
    fn a_spliced_or_repeated_stream_is_duplicated() {
        let two_ids = sse(&[&chunk("a", "one", None), &chunk("b", " two", Some("length")), "[DONE]"]);
        assert!(matches!(classify_stream(200, &two_ids, None, 2), Outcome::Duplicated(_)));
        let too_long = sse(&[&chunk("a", "one two three", Some("length")), "[DONE]"]);
        assert!(matches!(classify_stream(200, &too_long, None, 2), Outcome::Duplicated(_)));
        let two_done = sse(&[&chunk("a", "one two", Some("length")), "[DONE]", "[DONE]"]);
        assert!(matches!(classify_stream(200, &two_done, None, 2), Outcome::Duplicated(_)));
    }

    #[test]
    fn an_error_event_is_a_clean_error_and_a_cut_is_transport() {
        let body = sse(&[&chunk("a", "one", None), r#"{"error":{"message":"peer died","code":"stream_interrupted"}}"#]);
        assert_eq!(classify_stream(200, &body, None, 2), Outcome::CleanError("200 stream_interrupted".into()));
        let body = sse(&[&chunk("a", "one", None)]);
        assert!(matches!(classify_stream(200, &body, Some("reset".into()), 2), Outcome::Transport(_)));
    }

    #[test]
    fn documents_need_every_token_and_errors_need_the_openai_shape() {
        let whole = br#"{"choices":[{"message":{"content":"one two"},"finish_reason":"length"}]}"#;
        assert_eq!(classify_document(200, whole, 2), Outcome::Complete);
        assert!(matches!(classify_document(200, whole, 3), Outcome::Truncated(_)));
        assert!(matches!(classify_document(200, b"{\"choices\":[{\"mess", 2), Outcome::Truncated(_)));
        let error = br#"{"error":{"message":"busy","type":"x","code":"overloaded"}}"#;
        assert_eq!(classify_document(503, error, 2), Outcome::CleanError("503 overloaded".into()));
        assert!(matches!(classify_document(502, b"Bad Gateway", 2), Outcome::Malformed(_)));
        assert!(matches!(classify_document(500, b"{}", 2), Outcome::Malformed(_)));
    }

    #[test]
    fn transport_failures_are_excused_only_while_the_entry_was_down() {
        let mut downtime = Downtime::default();
        let before = Instant::now();
        downtime.down(1);
        downtime.up(1);
        let later = Instant::now() + std::time::Duration::from_secs(5);
        let record = |entry, start, end| Record {
            entry,
            stream: true,
            start,
            end,
            outcome: Outcome::Transport("reset".into()),
            served_by: None,
            forwarded: false,
        };
        let mut tally = Tally { sent: 3, ..Tally::default() };
        tally.add(&record(1, before, before), &downtime);
        tally.add(&record(0, before, before), &downtime);
        tally.add(&record(1, later, later), &downtime);
        assert_eq!(tally.entry_down, 1);
        assert_eq!(tally.connection_lost, 2);
        assert!(!tally.holds());
    }
}
