//! Token counts of a cloud response, read from the bytes relayed to the
//! client: OpenAI's `usage` object (JSON, or an SSE chunk when the client
//! asked for `stream_options.include_usage`), Ollama's `prompt_eval_count`
//! and `eval_count` (translated answers). A stream without a usage report
//! is estimated: one token per content chunk, prompt bytes / 4.

use serde_json::Value;

/// Largest non-streamed body kept for reading its usage.
const MAX_SCAN: usize = 4 * 1024 * 1024;

/// Tokens of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
    /// Whether the provider reported them (false: estimated).
    pub exact: bool,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads a response as it streams by.
#[derive(Debug, Default)]
pub struct UsageMeter {
    pending: Vec<u8>,
    whole: Vec<u8>,
    reported: Option<(u64, u64)>,
    content_chunks: u64,
    prompt_bytes: usize,
}

impl UsageMeter {
    /// A meter for a request whose body was `prompt_bytes` long.
    pub fn new(prompt_bytes: usize) -> UsageMeter {
        UsageMeter { prompt_bytes, ..UsageMeter::default() }
    }

    /// Feeds the next chunk of the response body.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.whole.len() + chunk.len() <= MAX_SCAN {
            self.whole.extend_from_slice(chunk);
        }
        self.pending.extend_from_slice(chunk);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.line(&line);
        }
    }

    fn line(&mut self, line: &[u8]) {
        // Most lines are content chunks: count them without a JSON parse.
        if !contains(line, b"usage") && !contains(line, b"eval_count") {
            if contains(line, b"\"content\":\"") && !contains(line, b"\"content\":\"\"")
                || contains(line, b"\"text\":\"") && !contains(line, b"\"text\":\"\"")
                || contains(line, b"\"response\":\"") && !contains(line, b"\"response\":\"\"")
            {
                self.content_chunks += 1;
            }
            return;
        }
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        let payload = text.strip_prefix("data:").map_or(text, str::trim);
        if payload.is_empty() || payload == "[DONE]" {
            return;
        }
        if let Ok(value) = serde_json::from_str::<Value>(payload) {
            self.value(&value);
        }
    }

    fn value(&mut self, value: &Value) {
        if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
            let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
            let completion = usage["completion_tokens"].as_u64().unwrap_or(0);
            self.reported = Some((prompt, completion));
        } else if value.get("eval_count").is_some() || value.get("prompt_eval_count").is_some() {
            let prompt = value["prompt_eval_count"].as_u64().unwrap_or(0);
            let completion = value["eval_count"].as_u64().unwrap_or(0);
            self.reported = Some((prompt, completion));
        }
        let delta = value.pointer("/choices/0/delta/content").or_else(|| value.pointer("/choices/0/text"));
        let ollama = value.pointer("/message/content").or_else(|| value.get("response"));
        if delta.or(ollama).and_then(Value::as_str).is_some_and(|t| !t.is_empty()) {
            self.content_chunks += 1;
        }
    }

    /// The counts once the body has ended.
    pub fn finish(mut self) -> Tokens {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.line(&rest);
        }
        if self.reported.is_none()
            && let Ok(value) = serde_json::from_slice::<Value>(&self.whole)
        {
            self.value(&value);
        }
        match self.reported {
            Some((prompt, completion)) => Tokens { prompt, completion, exact: true },
            None => Tokens { prompt: (self.prompt_bytes / 4) as u64, completion: self.content_chunks, exact: false },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openai_json_usage() {
        let mut meter = UsageMeter::new(100);
        let body = br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
        meter.push(&body[..20]);
        meter.push(&body[20..]);
        assert_eq!(meter.finish(), Tokens { prompt: 12, completion: 3, exact: true });
    }

    #[test]
    fn reads_a_usage_chunk_in_sse_and_estimates_without_one() {
        let with = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        let mut meter = UsageMeter::new(40);
        for piece in with.as_bytes().chunks(7) {
            meter.push(piece);
        }
        assert_eq!(meter.finish(), Tokens { prompt: 5, completion: 1, exact: true });
        let without = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: [DONE]\n\n";
        let mut meter = UsageMeter::new(40);
        meter.push(without.as_bytes());
        assert_eq!(meter.finish(), Tokens { prompt: 10, completion: 2, exact: false });
    }

    #[test]
    fn reads_ollama_counts() {
        let mut meter = UsageMeter::new(0);
        meter.push(b"{\"message\":{\"content\":\"x\"},\"done\":false}\n{\"done\":true,\"prompt_eval_count\":7,\"eval_count\":2}\n");
        assert_eq!(meter.finish(), Tokens { prompt: 7, completion: 2, exact: true });
    }
}
