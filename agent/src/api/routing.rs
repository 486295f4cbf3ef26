//! Reads what routing needs from a request body, once, at the edge: the
//! model, the stream flag, the output length and the conversation's prefix
//! key, as a [`RequestMeta`]. The body itself is forwarded as received.

use std::borrow::Cow;

use bytes::Bytes;
use llmesh_mesh::route::prefix::PrefixKey;
use llmesh_mesh::{ApiKind, RequestMeta};
use serde::Deserialize;
use serde::de::{Deserializer as _, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// Ollama's generation options, of which routing reads one.
#[derive(Deserialize)]
struct Options<'a> {
    #[serde(borrow, default)]
    num_predict: Option<&'a RawValue>,
}

/// The fields routing reads. Everything but `model`, `name` and `stream`
/// is read leniently: a field of another shape is the backend's to judge,
/// not a reason to refuse here.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    /// Older Ollama clients send `name` on `/api/show`.
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    options: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    /// The Responses API's prompt, its system prompt and output length.
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
}

/// A message's role, to find the first user turn.
#[derive(Deserialize)]
struct Role<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
}

/// Whether an API streams when the body does not say: Ollama's generation
/// endpoints do, OpenAI's do not.
fn streams_by_default(api: ApiKind) -> bool {
    matches!(api, ApiKind::OllamaChat | ApiKind::OllamaGenerate)
}

/// The output length asked for, when it is a number that fits.
fn output_tokens(peek: &Peek<'_>) -> Option<u32> {
    let num_predict =
        peek.options.and_then(|o| serde_json::from_str::<Options<'_>>(o.get()).ok()).and_then(|o| o.num_predict);
    let raw = peek.max_completion_tokens.or(peek.max_tokens).or(peek.max_output_tokens).or(num_predict)?;
    serde_json::from_str::<u32>(raw.get()).ok()
}

/// A key for the conversation a request continues: the model and every
/// message up to and including the first user message (or the system
/// prompt and the head of a completion prompt). Later turns of the same
/// conversation share it, so they can go where its KV cache is.
fn prefix_key(api: ApiKind, model: &str, peek: &Peek<'_>) -> Option<u64> {
    let key = PrefixKey::new(model);
    let with = |key: PrefixKey, raw: Option<&RawValue>| match raw {
        Some(raw) => key.push(raw.get().as_bytes()),
        None => key,
    };
    match api {
        ApiKind::OpenaiChat | ApiKind::OllamaChat => through_first_user(key, peek.messages?),
        // Anthropic's system prompt is a field of its own.
        ApiKind::AnthropicMessages => through_first_user(with(key, peek.system), peek.messages?),
        ApiKind::OpenaiResponses => {
            let key = with(key, peek.instructions);
            match serde_json::from_str::<Cow<'_, str>>(peek.input?.get()) {
                Ok(text) => Some(key.push(head(&text).as_bytes()).finish()),
                Err(_) => through_first_user(key, peek.input?),
            }
        }
        ApiKind::OpenaiCompletions | ApiKind::OllamaGenerate => {
            let text = |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<Cow<'_, str>>(r.get()).ok());
            let key = match text(peek.system) {
                Some(system) => key.push(system.as_bytes()),
                None => key,
            };
            let prompt = text(peek.prompt)?;
            Some(key.push(head(&prompt).as_bytes()).finish())
        }
        _ => None,
    }
}

/// The first 512 characters of a prompt: enough to tell conversations apart.
fn head(text: &str) -> String {
    text.chars().take(512).collect()
}

/// `key` extended with every message up to and including the first user
/// message of the array `messages`.
fn through_first_user(key: PrefixKey, messages: &RawValue) -> Option<u64> {
    /// Walks the array once, hashing messages until the first user one
    /// (no vector of the messages is built: this runs on every request).
    struct UpToFirstUser(PrefixKey);

    impl<'de> Visitor<'de> for UpToFirstUser {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of messages")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<u64>, A::Error> {
            let mut key = Some(self.0);
            let mut through_user = None;
            while let Some(message) = seq.next_element::<&'de RawValue>()? {
                let Some(so_far) = key.take() else { continue };
                let so_far = so_far.push(message.get().as_bytes());
                let role = serde_json::from_str::<Role<'_>>(message.get()).ok().and_then(|r| r.role);
                if role.as_deref() == Some("user") {
                    through_user = Some(so_far.finish());
                } else {
                    key = Some(so_far);
                }
            }
            Ok(through_user)
        }
    }

    serde_json::Deserializer::from_str(messages.get()).deserialize_seq(UpToFirstUser(key)).ok().flatten()
}

/// JSON's name for the type of `raw`, as Go's decoder words it.
fn json_type(raw: &RawValue) -> &'static str {
    let text = raw.get().trim_start();
    if text.starts_with('"') {
        "string"
    } else if text.starts_with('[') {
        "array"
    } else if text.starts_with(char::is_alphabetic) {
        match text.as_bytes()[0] {
            b't' | b'f' => "bool",
            _ => "null",
        }
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        "number"
    } else {
        "object"
    }
}

/// Ollama decodes its bodies into typed Go structs and answers 400 for a
/// field of the wrong type; a body it would refuse must not be served (a
/// `messages` string would otherwise run as an empty conversation).
fn check_ollama_types(api: ApiKind, peek: &Peek<'_>) -> Result<(), ApiError> {
    /// A field: its name, its value, the JSON type and the Go type Ollama wants.
    type Field<'a> = (&'a str, Option<&'a RawValue>, &'a str, &'a str);
    let (request, fields): (&str, &[Field<'_>]) = match api {
        ApiKind::OllamaChat => ("ChatRequest", &[("messages", peek.messages, "array", "[]api.Message")]),
        ApiKind::OllamaGenerate => (
            "GenerateRequest",
            &[("prompt", peek.prompt, "string", "string"), ("system", peek.system, "string", "string")],
        ),
        _ => return Ok(()),
    };
    for (name, raw, want, go_type) in fields {
        if let Some(raw) = raw {
            let found = json_type(raw);
            if found != *want && found != "null" {
                return Err(ApiError::bad_request(format!(
                    "json: cannot unmarshal {found} into Go struct field {request}.{name} of type {go_type}"
                )));
            }
        }
    }
    Ok(())
}

/// Parses what routing needs, rejecting what no backend could serve. The
/// tenant is the caller's, set by the handler.
pub fn parse(api: ApiKind, body: &Bytes) -> Result<RequestMeta, ApiError> {
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
        .clone()
        .filter(|m| !m.is_empty())
        .or(if api == ApiKind::OllamaShow { peek.name.clone() } else { None })
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing required field 'model'"))?;
    if model.len() > 512 {
        return Err(ApiError::bad_request("model name is longer than 512 bytes"));
    }
    check_ollama_types(api, &peek)?;
    let stream = match api {
        ApiKind::OpenaiEmbeddings
        | ApiKind::OllamaEmbed
        | ApiKind::OllamaEmbeddings
        | ApiKind::OllamaShow
        | ApiKind::AnthropicCountTokens => false,
        _ => peek.stream.unwrap_or(streams_by_default(api)),
    };
    Ok(RequestMeta {
        output_tokens: output_tokens(&peek),
        prefix: prefix_key(api, &model, &peek),
        depth: u32::try_from(body.len()).unwrap_or(u32::MAX),
        model: model.into_owned(),
        stream,
        tenant: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields(api: ApiKind, body: &str) -> Result<RequestMeta, ApiError> {
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
    fn anthropic_and_responses_turns_share_a_key_and_give_their_output_length() {
        let first = r#"{"model":"m","system":"be brief","max_tokens":9,"messages":[{"role":"user","content":"hi"}]}"#;
        let later = r#"{"model":"m","system":"be brief","max_tokens":5,"messages":[{"role":"user","content":"hi"},
            {"role":"assistant","content":"hello"},{"role":"user","content":"more"}]}"#;
        let a = fields(ApiKind::AnthropicMessages, first).expect("ok");
        assert_eq!((a.output_tokens, a.stream), (Some(9), false));
        assert_eq!(a.prefix, fields(ApiKind::AnthropicMessages, later).expect("ok").prefix);
        let other_system = first.replace("be brief", "be long");
        assert_ne!(a.prefix, fields(ApiKind::AnthropicMessages, &other_system).expect("ok").prefix);
        let r =
            fields(ApiKind::OpenaiResponses, r#"{"model":"m","input":"tell me","max_output_tokens":7,"stream":true}"#)
                .expect("ok");
        assert_eq!((r.output_tokens, r.stream, r.prefix.is_some()), (Some(7), true, true));
        let counted = fields(ApiKind::AnthropicCountTokens, first).expect("ok");
        assert!(!counted.stream);
    }

    #[test]
    fn ollama_bodies_with_fields_of_the_wrong_type_are_refused_as_ollama_would() {
        let err = |api, body: &str| fields(api, body).err().map(|e| e.message);
        assert_eq!(
            err(ApiKind::OllamaChat, r#"{"model":"m","messages":"notalist"}"#).as_deref(),
            Some("json: cannot unmarshal string into Go struct field ChatRequest.messages of type []api.Message")
        );
        assert_eq!(
            err(ApiKind::OllamaGenerate, r#"{"model":"m","prompt":5}"#).as_deref(),
            Some("json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string")
        );
        // Absent or null is Ollama's "load the model"; OpenAI's APIs are the
        // backend's to judge.
        assert!(fields(ApiKind::OllamaChat, r#"{"model":"m"}"#).is_ok());
        assert!(fields(ApiKind::OllamaGenerate, r#"{"model":"m","prompt":null}"#).is_ok());
        assert!(fields(ApiKind::OpenaiChat, r#"{"model":"m","messages":"x"}"#).is_ok());
    }

    #[test]
    fn turns_of_one_conversation_share_a_prefix_key() {
        let first = r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}]}"#;
        let later = r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"},{"role":"assistant","content":"yo"},{"role":"user","content":"more"}]}"#;
        let other = r#"{"model":"m","messages":[{"role":"user","content":"different"}]}"#;
        let key = |b: &str| fields(ApiKind::OpenaiChat, b).expect("ok").prefix;
        assert!(key(first).is_some());
        assert_eq!(key(first), key(later));
        assert_ne!(key(first), key(other));
        assert_ne!(key(first), key(&first.replace(r#""model":"m""#, r#""model":"n""#)));
        assert_eq!(fields(ApiKind::OpenaiEmbeddings, first).expect("ok").prefix, None);
        // Messages of another shape (on OpenAI's API) are the backend's to refuse.
        assert_eq!(fields(ApiKind::OpenaiChat, r#"{"model":"m","messages":"x"}"#).expect("ok").prefix, None);
        let completion = |p: &str| {
            fields(ApiKind::OpenaiCompletions, &format!(r#"{{"model":"m","prompt":{p}}}"#)).expect("ok").prefix
        };
        assert!(completion(r#""once upon""#).is_some());
        assert_eq!(completion("[1,2,3]"), None);
    }

    #[test]
    fn output_length_comes_from_any_of_its_names() {
        let tokens = |b: &str| fields(ApiKind::OpenaiChat, b).expect("ok").output_tokens;
        assert_eq!(tokens(r#"{"model":"m","max_tokens":7}"#), Some(7));
        assert_eq!(tokens(r#"{"model":"m","max_completion_tokens":8,"max_tokens":7}"#), Some(8));
        assert_eq!(tokens(r#"{"model":"m","options":{"num_predict":9}}"#), Some(9));
        assert_eq!(tokens(r#"{"model":"m","options":{"num_predict":-1}}"#), None);
        assert_eq!(tokens(r#"{"model":"m","max_tokens":null}"#), None);
        assert_eq!(tokens(r#"{"model":"m","max_tokens":"many"}"#), None);
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
            prop_assert_eq!((parsed.model, parsed.stream), (model, stream));
        }
    }
}
