//! Token counts of a response (local, forwarded or cloud), read from the bytes
//! relayed to the client: OpenAI's `usage` object (JSON, or an SSE chunk when the client
//! asked for `stream_options.include_usage`), Ollama's `prompt_eval_count`
//! and `eval_count` (translated answers). A stream without a usage report
//! is estimated: one token per content chunk, prompt bytes / 4.

use std::sync::LazyLock;

use memchr::memmem::Finder;

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

/// Reads a response as it streams by. Every request's body passes through
/// here, so it never builds a JSON tree: it finds the few fields it needs
/// by their names and decodes only those.
#[derive(Debug, Default)]
pub struct UsageMeter {
    pending: Vec<u8>,
    reported: Option<(u64, u64)>,
    content_chunks: u64,
    prompt_bytes: usize,
}

// Needles searched for in every line of every response, built once.
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\":"));
// OpenAI's usage object names the counts `prompt_tokens` and
// `completion_tokens`; Anthropic's and the Responses API's `input_tokens`
// and `output_tokens`.
static PROMPT_TOKENS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"prompt_tokens\":"));
static COMPLETION_TOKENS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"completion_tokens\":"));
static INPUT_TOKENS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"input_tokens\":"));
static OUTPUT_TOKENS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"output_tokens\":"));
static EVAL_COUNT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"eval_count\":"));
static PROMPT_EVAL_COUNT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"prompt_eval_count\":"));
static CONTENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"content\":\""));
static TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"text\":\""));
static RESPONSE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"response\":\""));

/// Where `needle` ends in `line`.
fn end_of(line: &[u8], needle: &Finder<'_>) -> Option<usize> {
    needle.find(line).map(|at| at + needle.needle().len())
}

/// The unsigned number right after `"name":` in `line`.
fn number_after(line: &[u8], name: &Finder<'_>) -> Option<u64> {
    let at = end_of(line, name)?;
    let rest = &line[at..];
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let digits: &[u8] = &rest[start..];
    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// The JSON object `text` starts with (after blanks), through its closing
/// brace; `None` when `text` starts with anything else (`null`: OpenAI
/// streams say `"usage":null` in every chunk but the last) or the object
/// is cut short. A scan for the closing brace, not a parse: the meter runs
/// on every response and needs two numbers from the object.
fn object_at(text: &[u8]) -> Option<&[u8]> {
    // The JSON punctuation the scan looks for, by code (ASCII).
    const OPEN: u8 = 0x7B;
    const CLOSE: u8 = 0x7D;
    const QUOTE: u8 = 0x22;
    const ESCAPE: u8 = 0x5C;
    let start = text.iter().position(|b| !b.is_ascii_whitespace())?;
    if text[start] != OPEN {
        return None;
    }
    let (mut depth, mut at) = (0usize, start);
    loop {
        let found = at + memchr::memchr3(OPEN, CLOSE, QUOTE, text.get(at..)?)?;
        at = found + 1;
        match text[found] {
            QUOTE => {
                // To the closing quote, past escaped ones.
                loop {
                    let quote_or_escape = at + memchr::memchr2(QUOTE, ESCAPE, text.get(at..)?)?;
                    let closed = text[quote_or_escape] == QUOTE;
                    at = quote_or_escape + if closed { 1 } else { 2 };
                    if closed {
                        break;
                    }
                }
            }
            OPEN => depth += 1,
            _ => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..at]);
                }
            }
        }
    }
}

/// Whether `"field":"` is followed by at least one character.
fn non_empty(line: &[u8], field: &Finder<'_>) -> bool {
    end_of(line, field).is_some_and(|at| line.get(at).is_some_and(|b| *b != b'"'))
}

impl UsageMeter {
    /// A meter for a request whose body was `prompt_bytes` long.
    pub fn new(prompt_bytes: usize) -> UsageMeter {
        UsageMeter { prompt_bytes, ..UsageMeter::default() }
    }

    /// Feeds the next chunk of the response body.
    pub fn push(&mut self, chunk: &[u8]) {
        // The common case, a chunk of whole lines, is read in place.
        let mut rest = chunk;
        if !self.pending.is_empty() {
            let Some(end) = memchr::memchr(b'\n', chunk) else {
                self.pending.extend_from_slice(chunk);
                return;
            };
            let mut line = std::mem::take(&mut self.pending);
            line.extend_from_slice(&chunk[..end]);
            self.line(&line);
            line.clear();
            self.pending = line;
            rest = &chunk[end + 1..];
        }
        let mut consumed = 0;
        for end in memchr::memchr_iter(b'\n', rest) {
            self.line(&rest[consumed..end]);
            consumed = end + 1;
        }
        self.pending.extend_from_slice(&rest[consumed..]);
    }

    fn line(&mut self, line: &[u8]) {
        if let Some(at) = end_of(line, &USAGE) {
            if let Some(usage) = object_at(&line[at..]) {
                let count = |openai, anthropic| number_after(usage, openai).or_else(|| number_after(usage, anthropic));
                let reported_prompt = count(&PROMPT_TOKENS, &INPUT_TOKENS).unwrap_or(0);
                let reported_completion = count(&COMPLETION_TOKENS, &OUTPUT_TOKENS).unwrap_or(0);
                // Anthropic reports input at the start and output at the end
                // of a stream: keep the largest of each.
                let (prompt, completion) = self.reported.unwrap_or_default();
                self.reported = Some((prompt.max(reported_prompt), completion.max(reported_completion)));
            }
        } else if let Some(completion) = number_after(line, &EVAL_COUNT) {
            let prompt = number_after(line, &PROMPT_EVAL_COUNT).unwrap_or(0);
            self.reported = Some((prompt, completion));
        }
        // Content is counted only to estimate a stream that reports no
        // usage; once it has, the three searches per line are wasted.
        if self.reported.is_none()
            && (non_empty(line, &CONTENT) || non_empty(line, &TEXT) || non_empty(line, &RESPONSE))
        {
            self.content_chunks += 1;
        }
    }

    /// The counts once the body has ended.
    pub fn finish(mut self) -> Tokens {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.line(&rest);
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

    #[test]
    fn reads_anthropic_and_responses_usage_around_nested_details() {
        let mut meter = UsageMeter::new(0);
        meter.push(b"event: message_start\ndata: {\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":9,\"output_tokens\":1}}}\n\n");
        meter.push(b"event: message_delta\ndata: {\"delta\":{},\"usage\":{\"output_tokens\":15}}\n\n");
        assert_eq!(meter.finish(), Tokens { prompt: 25, completion: 15, exact: true });

        let mut meter = UsageMeter::new(0);
        meter.push(br#"{"usage":{"input_tokens_details":{"cached_tokens":4},"input_tokens":30,"output_tokens":6,"output_tokens_details":{"reasoning_tokens":2}},"note":"prompt_tokens\": 99 {"}"#);
        assert_eq!(meter.finish(), Tokens { prompt: 30, completion: 6, exact: true });
    }

    #[test]
    fn a_null_or_cut_short_usage_is_not_a_report() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\ndata: [DONE]\n\n";
        let mut meter = UsageMeter::new(8);
        meter.push(stream.as_bytes());
        assert_eq!(meter.finish(), Tokens { prompt: 2, completion: 1, exact: false });

        let mut meter = UsageMeter::new(8);
        meter.push(br#"{"usage":{"prompt_tokens":5,"completion_tokens":"#);
        assert_eq!(meter.finish(), Tokens { prompt: 2, completion: 0, exact: false });

        // A brace inside a string does not end the object early.
        let mut meter = UsageMeter::new(8);
        meter.push(br#"{"usage":{"label":"a}\"}","prompt_tokens":3,"completion_tokens":4}}"#);
        assert_eq!(meter.finish(), Tokens { prompt: 3, completion: 4, exact: true });
        let mut meter = UsageMeter::new(8);
        meter.push(br#"{"usage":{"label":"x\\","prompt_tokens":1,"completion_tokens":2}}"#);
        assert_eq!(meter.finish(), Tokens { prompt: 1, completion: 2, exact: true });
    }
}
