//! Wire types shared between llmesh nodes, generated from `proto/llmesh.proto`.
//!
//! The gossip plane carries [`NodeState`]; the data plane carries
//! [`RequestHead`], [`ResponseHead`] and [`Trailer`] around raw body bytes;
//! the control plane carries Raft batches, [`Command`]s and the Admin service.
#![forbid(unsafe_code)]

pub mod frame;

#[allow(missing_docs, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/llmesh.v1.rs"));
}

pub use generated::*;

/// Version of the node-to-node protocol; a peer speaking another gets a
/// clear refusal instead of undecodable frames.
pub const PROTOCOL_VERSION: u32 = 1;

/// Upper bounds (milliseconds) of the buckets of
/// [`NodeState::ttft_ms_histogram`]; one more bucket holds the rest.
pub const TTFT_BUCKETS_MS: [u64; 14] =
    [5, 10, 25, 50, 100, 250, 500, 1_000, 2_000, 4_000, 8_000, 15_000, 30_000, 60_000];

impl ApiKind {
    /// Whether a streamed response of this API uses Server-Sent Events
    /// (OpenAI) rather than newline-delimited JSON (Ollama).
    pub fn streams_sse(self) -> bool {
        !self.is_ollama_native() && self != ApiKind::Unspecified
    }

    /// Whether this API is Anthropic's (`/v1/messages*`), whose errors
    /// have Anthropic's shape.
    pub fn is_anthropic(self) -> bool {
        matches!(self, ApiKind::AnthropicMessages | ApiKind::AnthropicCountTokens)
    }

    /// Whether the API is one of Ollama's own (`/api/*`).
    pub fn is_ollama_native(self) -> bool {
        matches!(
            self,
            ApiKind::OllamaChat
                | ApiKind::OllamaGenerate
                | ApiKind::OllamaEmbed
                | ApiKind::OllamaEmbeddings
                | ApiKind::OllamaShow
        ) || self.is_management()
    }

    /// Whether the API manages models (pull, delete, copy, create, push)
    /// rather than running one: carried out on the node it is sent to,
    /// without waiting for an inference slot.
    pub fn is_management(self) -> bool {
        matches!(
            self,
            ApiKind::OllamaPull
                | ApiKind::OllamaDelete
                | ApiKind::OllamaCopy
                | ApiKind::OllamaCreate
                | ApiKind::OllamaPush
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn request_head_round_trips() {
        let head = RequestHead {
            protocol_version: PROTOCOL_VERSION,
            request_id: "r-1".into(),
            api: ApiKind::OllamaChat as i32,
            model: "qwen2.5:7b".into(),
            stream: true,
            deadline_ms: 30_000,
            tenant: "k1".into(),
            affinity_key: 42,
            max_tokens: 64,
            queue_ms: 5_000,
            reserve: true,
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        };
        let bytes = head.encode_to_vec();
        let back = RequestHead::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, head);
        assert_eq!(back.api(), ApiKind::OllamaChat);
    }

    #[test]
    fn stream_format_follows_api_family() {
        assert!(ApiKind::OpenaiChat.streams_sse());
        assert!(!ApiKind::OllamaGenerate.streams_sse());
        assert!(ApiKind::OllamaShow.is_ollama_native());
        assert!(!ApiKind::OpenaiEmbeddings.is_ollama_native());
    }
}
