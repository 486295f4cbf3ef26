//! Reads only what routing needs from a request body (model and stream
//! flag); the body itself is forwarded as received.

use bytes::Bytes;
use llmesh_mesh::ApiKind;
use serde::Deserialize;

use crate::error::ApiError;

/// The fields of a body that decide where and how it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingFields {
    /// Requested model.
    pub model: String,
    /// Whether the response streams.
    pub stream: bool,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    /// Older Ollama clients send `name` on `/api/show`.
    #[serde(borrow, default)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Whether an API streams when the body does not say: Ollama's generation
/// endpoints do, OpenAI's do not.
fn streams_by_default(api: ApiKind) -> bool {
    matches!(api, ApiKind::OllamaChat | ApiKind::OllamaGenerate)
}

/// Parses the routing fields, rejecting what no backend could serve.
pub fn parse(api: ApiKind, body: &Bytes) -> Result<RoutingFields, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("request body is empty; expected a JSON object"));
    }
    let peek: Peek = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::bad_request(format!("invalid request body: {e}"))
        } else {
            ApiError::bad_request(format!("malformed JSON in request body: {e}"))
        }
    })?;
    let model = peek
        .model
        .filter(|m| !m.is_empty())
        .or(if api == ApiKind::OllamaShow { peek.name } else { None })
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing required field 'model'"))?;
    if model.len() > 512 {
        return Err(ApiError::bad_request("model name is longer than 512 bytes"));
    }
    let stream = match api {
        ApiKind::OpenaiEmbeddings | ApiKind::OllamaEmbed | ApiKind::OllamaEmbeddings | ApiKind::OllamaShow => false,
        _ => peek.stream.unwrap_or(streams_by_default(api)),
    };
    Ok(RoutingFields { model: model.into_owned(), stream })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields(api: ApiKind, body: &str) -> Result<RoutingFields, ApiError> {
        parse(api, &Bytes::copy_from_slice(body.as_bytes()))
    }

    #[test]
    fn stream_defaults_follow_each_api() {
        let openai = fields(ApiKind::OpenaiChat, r#"{"model":"m","messages":[]}"#).expect("ok");
        assert!(!openai.stream);
        let ollama = fields(ApiKind::OllamaChat, r#"{"model":"m","messages":[]}"#).expect("ok");
        assert!(ollama.stream);
        let off = fields(ApiKind::OllamaGenerate, r#"{"model":"m","stream":false}"#).expect("ok");
        assert!(!off.stream);
        let embed = fields(ApiKind::OllamaEmbed, r#"{"model":"m","stream":true}"#).expect("ok");
        assert!(!embed.stream);
    }

    #[test]
    fn rejects_what_cannot_be_routed() {
        for (body, needle) in [
            ("", "empty"),
            ("{", "malformed"),
            ("[1,2]", "invalid request body"),
            (r#"{"messages":[]}"#, "model"),
            (r#"{"model":""}"#, "model"),
            (r#"{"model":5}"#, "invalid type"),
            (r#"{"model":"m","stream":"yes"}"#, "invalid type"),
        ] {
            let err = fields(ApiKind::OpenaiChat, body).expect_err(body);
            assert_eq!(err.status, 400);
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
    }

    #[test]
    fn show_accepts_the_legacy_name_field() {
        assert_eq!(fields(ApiKind::OllamaShow, r#"{"name":"llama3"}"#).expect("ok").model, "llama3");
        assert!(fields(ApiKind::OllamaChat, r#"{"name":"llama3"}"#).is_err());
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        assert_eq!(fields(ApiKind::OpenaiChat, r#"{"model":"a\u003ab"}"#).expect("ok").model, "a:b");
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(ApiKind::OpenaiChat, &Bytes::from(bytes));
        }

        #[test]
        fn finds_any_model_name(model in "[a-zA-Z0-9._:/-]{1,64}", stream in any::<bool>()) {
            let body = serde_json::json!({ "messages": [{"role": "user", "content": "x"}], "model": model, "stream": stream });
            let parsed = parse(ApiKind::OpenaiChat, &Bytes::from(body.to_string())).expect("valid");
            prop_assert_eq!(parsed, RoutingFields { model, stream });
        }
    }
}
