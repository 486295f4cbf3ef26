//! The `model` field of a response names the model the client asked for.
//! A route (`fast` → `qwen2.5:7b`) or a cloud provider's own id
//! (`qwen/qwen-2.5-7b-instruct`) changes the name the backend sees; its
//! answer is renamed back on the way out, line by line for streams (SSE
//! events and NDJSON lines are lines), so every API and every route says
//! the same. When the names are equal nothing is touched.

use bytes::Bytes;
use futures::StreamExt;
use llmesh_mesh::BodyStream;

/// `line` with its first `"model": "<from>"` renamed to `to`, or `None`
/// when it has none.
pub fn rename_line(line: &[u8], from: &str, to: &str) -> Option<Vec<u8>> {
    const KEY: &[u8] = b"\"model\"";
    let mut at = 0;
    while let Some(found) = find(&line[at..], KEY) {
        let key_end = at + found + KEY.len();
        let mut i = key_end;
        let skip = |i: &mut usize| {
            while line.get(*i).is_some_and(u8::is_ascii_whitespace) {
                *i += 1;
            }
        };
        skip(&mut i);
        if line.get(i) == Some(&b':') {
            i += 1;
            skip(&mut i);
            let quoted = format!("\"{from}\"");
            if line[i..].starts_with(quoted.as_bytes()) {
                let mut out = Vec::with_capacity(line.len() + to.len());
                out.extend_from_slice(&line[..i]);
                out.push(b'"');
                out.extend_from_slice(to.as_bytes());
                out.push(b'"');
                out.extend_from_slice(&line[i + quoted.len()..]);
                return Some(out);
            }
        }
        at = key_end;
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `body` with the model renamed from `from` to `to` in every line.
pub fn rename(body: BodyStream, from: String, to: String) -> BodyStream {
    if from == to {
        return body;
    }
    Box::pin(async_stream::stream! {
        let mut body = body;
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = body.next().await {
            let bytes = match chunk {
                Ok(bytes) => bytes,
                Err(err) => {
                    yield Err(err);
                    return;
                }
            };
            pending.extend_from_slice(&bytes);
            let Some(end) = pending.iter().rposition(|b| *b == b'\n') else { continue };
            let complete: Vec<u8> = pending.drain(..=end).collect();
            yield Ok(Bytes::from(rename_lines(&complete, &from, &to)));
        }
        if !pending.is_empty() {
            yield Ok(Bytes::from(rename_lines(&pending, &from, &to)));
        }
    })
}

fn rename_lines(text: &[u8], from: &str, to: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for line in text.split_inclusive(|b| *b == b'\n') {
        match rename_line(line, from, to) {
            Some(renamed) => out.extend_from_slice(&renamed),
            None => out.extend_from_slice(line),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_model_field_is_renamed() {
        let line = br#"data: {"id":"x","model":"qwen2.5:7b","choices":[{"delta":{"content":"model qwen2.5:7b"}}]}"#;
        let out = rename_line(line, "qwen2.5:7b", "fast").expect("renamed");
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"data: {"id":"x","model":"fast","choices":[{"delta":{"content":"model qwen2.5:7b"}}]}"#
        );
        let spaced = br#"{"model" : "a", "x": 1}"#;
        assert_eq!(rename_line(spaced, "a", "b").as_deref(), Some(&br#"{"model" : "b", "x": 1}"#[..]));
        assert!(rename_line(br#"{"model":"other"}"#, "a", "b").is_none());
        assert!(rename_line(br#"{"content":"\"model\""}"#, "a", "b").is_none());
    }

    #[tokio::test]
    async fn a_stream_cut_anywhere_is_renamed_whole() {
        let text = "data: {\"model\":\"long-name:7b\",\"n\":1}\n\ndata: {\"model\":\"long-name:7b\",\"n\":2}\n\ndata: [DONE]\n\n";
        for cut in [1, 5, 17, text.len()] {
            let chunks: Vec<Result<Bytes, llmesh_mesh::StreamError>> =
                text.as_bytes().chunks(cut).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            let body: BodyStream = Box::pin(futures::stream::iter(chunks));
            let out: Vec<u8> = rename(body, "long-name:7b".into(), "m".into())
                .filter_map(|c| async move { c.ok() })
                .flat_map(|b| futures::stream::iter(b.to_vec()))
                .collect()
                .await;
            assert_eq!(String::from_utf8_lossy(&out), text.replace("long-name:7b", "m"), "cut every {cut}");
        }
    }
}
