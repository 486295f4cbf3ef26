//! The HTTP request path after the body is read: every API's routing parse,
//! the model rewrite for routes, and the Ollama-to-OpenAI translation used
//! for cloud providers, on arbitrary bodies. They may refuse a body, never
//! panic, and a rewritten body still parses with the new model.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use llmesh::api::access::rewrite_model;
use llmesh::api::routing::parse;
use llmesh::backend::translate;
use llmesh_proto::ApiKind;

const APIS: [ApiKind; 9] = [
    ApiKind::OpenaiChat,
    ApiKind::OpenaiCompletions,
    ApiKind::OpenaiEmbeddings,
    ApiKind::OllamaChat,
    ApiKind::OllamaGenerate,
    ApiKind::OllamaEmbed,
    ApiKind::OllamaEmbeddings,
    ApiKind::OllamaShow,
    ApiKind::Unspecified,
];

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    for api in APIS {
        let Ok(fields) = parse(api, &body) else { continue };
        assert!(!fields.model.is_empty());
        if let Ok(rewritten) = rewrite_model(&body, "routed:model") {
            let again = parse(ApiKind::OpenaiChat, &rewritten).expect("a rewritten body parses");
            assert_eq!(again.model, "routed:model");
        }
    }
    let _ = translate::chat_request(data, true);
    let _ = translate::generate_request(data, false);
    let _ = translate::embed_request(data, true);
    let _ = translate::error_message(data);
});
