//! Configuration of the simulated backend: models, capacity, speeds, faults.

use serde::{Deserialize, Serialize};

/// One model the sim pretends to have on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimModel {
    /// Ollama-style name, e.g. `qwen2.5:7b`.
    pub name: String,
    /// Size on disk and in VRAM once loaded, in bytes.
    pub size_bytes: u64,
    /// Model family, e.g. `qwen2`.
    pub family: String,
    /// Quantization level, e.g. `Q4_K_M`.
    pub quantization: String,
    /// Parameter count as Ollama prints it, e.g. `7B`.
    pub parameter_size: String,
}

impl SimModel {
    /// Parses one item of a model SPEC: `name` or
    /// `name+size=4.7G+family=qwen2+quant=Q8_0`. Missing fields are derived
    /// from the name (the `7b` in `qwen2.5:7b` gives a parameter size and a
    /// plausible Q4 file size).
    pub fn parse(spec: &str) -> Result<SimModel, String> {
        let mut parts = spec.trim().split('+');
        let name = parts.next().unwrap_or_default().trim().to_string();
        if name.is_empty() {
            return Err(format!("empty model name in spec '{spec}'"));
        }
        let billions =
            name.rsplit(':').next().and_then(|tag| tag.strip_suffix(['b', 'B'])).and_then(|n| n.parse::<f64>().ok());
        let family = name
            .split(':')
            .next()
            .unwrap_or(&name)
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '.')
            .to_string();
        let mut model = SimModel {
            size_bytes: billions.map_or(300_000_000, |b| (b * 0.6e9) as u64),
            parameter_size: billions.map_or_else(|| "137M".to_string(), |b| format!("{b}B")),
            family: if family.is_empty() { "sim".into() } else { family },
            quantization: "Q4_K_M".into(),
            name,
        };
        for part in parts {
            let (key, value) =
                part.split_once('=').ok_or_else(|| format!("expected key=value in model spec, got '{part}'"))?;
            match key.trim() {
                "size" => model.size_bytes = parse_size(value.trim())?,
                "family" => model.family = value.trim().to_string(),
                "quant" | "quantization" => model.quantization = value.trim().to_string(),
                "params" => model.parameter_size = value.trim().to_string(),
                other => return Err(format!("unknown model spec key '{other}'")),
            }
        }
        Ok(model)
    }

    /// Whether the model is an embedding model (by name, as Ollama users
    /// name them: `nomic-embed-text`, `mxbai-embed-large`).
    pub fn is_embedding(&self) -> bool {
        self.name.contains("embed")
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let upper = text.to_ascii_uppercase();
    let (number, scale) = if let Some(n) = upper.strip_suffix('G') {
        (n, 1e9)
    } else if let Some(n) = upper.strip_suffix('M') {
        (n, 1e6)
    } else {
        (upper.as_str(), 1.0)
    };
    number.parse::<f64>().map(|n| (n * scale) as u64).map_err(|_| format!("bad size '{text}' (use e.g. 4.7G or 300M)"))
}

/// Faults the sim injects; changeable at run time through `POST /sim/faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct Faults {
    /// Fraction of requests (0..1) answered with HTTP 500.
    #[arg(long = "fault-error-rate", default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fraction of requests (0..1) that never get an answer.
    #[arg(long = "fault-hang-rate", default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Drop the connection after this many generated tokens.
    #[arg(long = "fault-drop-after")]
    pub drop_after_tokens: Option<u32>,
}

/// Everything that shapes the simulated backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct SimConfig {
    /// Models on disk, comma-separated; each `name[+size=4.7G][+family=F][+quant=Q]`.
    #[arg(long = "models", value_delimiter = ',', default_value = "qwen2.5:7b,llama3.2:3b,nomic-embed-text")]
    pub models: Vec<String>,
    /// Models loaded at start (default: the first `max-loaded` models).
    #[arg(long = "preload", value_delimiter = ',')]
    pub preload: Option<Vec<String>>,
    /// Requests a loaded model serves at once (like OLLAMA_NUM_PARALLEL);
    /// more wait in a FIFO queue.
    #[arg(long = "slots", default_value_t = 4)]
    pub slots: u32,
    /// Models that fit in memory at once; loading one more evicts the least
    /// recently used (like OLLAMA_MAX_LOADED_MODELS).
    #[arg(long = "max-loaded", default_value_t = 3)]
    pub max_loaded: usize,
    /// Prompt evaluation speed in tokens/s (0 = instant).
    #[arg(long = "prompt-tps", default_value_t = 0.0)]
    pub prompt_tps: f64,
    /// Decode speed in tokens/s (0 = instant).
    #[arg(long = "decode-tps", default_value_t = 0.0)]
    pub decode_tps: f64,
    /// Time to load a cold model, in milliseconds.
    #[arg(long = "load-ms", default_value_t = 0)]
    pub load_ms: u64,
    /// Tokens generated when the request sets no max_tokens / num_predict.
    #[arg(long = "output-tokens", default_value_t = 16)]
    pub output_tokens: u32,
    /// Prompt prefixes remembered per model; a cached prefix skips its
    /// prompt-evaluation time.
    #[arg(long = "prefix-cache", default_value_t = 1024)]
    pub prefix_cache_entries: usize,
    /// Dimensions of generated embeddings.
    #[arg(long = "embedding-dim", default_value_t = 384)]
    pub embedding_dim: usize,
    /// Seed for output text and fault decisions.
    #[arg(long = "seed", default_value_t = 0)]
    pub seed: u64,
    /// Fixed ids, timestamps and durations: the same request always gets
    /// byte-identical responses (for relay tests).
    #[arg(long = "deterministic")]
    pub deterministic: bool,
    /// Close the connection after every streamed response without saying
    /// so (no `Connection: close`), as llama-server does: a client that
    /// pools the connection finds it dead on its next request.
    #[arg(long = "close-after-stream")]
    pub close_after_stream: bool,
    /// Serve no Anthropic Messages or OpenAI Responses API (404 on their
    /// paths), as Ollama before 0.13.3 and older vLLM releases.
    #[arg(long = "chat-only")]
    pub chat_only: bool,
    /// How long a pull takes (`/api/pull`, with progress lines), in ms.
    #[arg(long = "pull-ms", default_value_t = 1000)]
    pub pull_ms: u64,
    /// Disk space for models in bytes; a pull that would overflow it fails
    /// as Ollama's does. Unlimited when unset.
    #[arg(long = "disk-bytes")]
    pub disk_bytes: Option<u64>,
    /// Faults to inject.
    #[command(flatten)]
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            models: vec!["qwen2.5:7b".into(), "llama3.2:3b".into(), "nomic-embed-text".into()],
            preload: None,
            slots: 4,
            max_loaded: 3,
            prompt_tps: 0.0,
            decode_tps: 0.0,
            load_ms: 0,
            output_tokens: 16,
            prefix_cache_entries: 1024,
            embedding_dim: 384,
            seed: 0,
            deterministic: false,
            close_after_stream: false,
            chat_only: false,
            pull_ms: 1000,
            disk_bytes: None,
            faults: Faults::default(),
        }
    }
}

impl SimConfig {
    /// The parsed model list, or a message naming the bad item.
    pub fn parsed_models(&self) -> Result<Vec<SimModel>, String> {
        self.models.iter().map(|spec| SimModel::parse(spec)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_fields_from_the_name() {
        let m = SimModel::parse("qwen2.5:7b").expect("parses");
        assert_eq!(m.family, "qwen");
        assert_eq!(m.parameter_size, "7B");
        assert_eq!(m.size_bytes, 4_200_000_000);
    }

    #[test]
    fn explicit_fields_override() {
        let m = SimModel::parse("llama3.3:70b+size=42G+family=llama+quant=Q8_0").expect("parses");
        assert_eq!(m.size_bytes, 42_000_000_000);
        assert_eq!(m.family, "llama");
        assert_eq!(m.quantization, "Q8_0");
        assert!(SimModel::parse("x+color=red").is_err());
        assert!(SimModel::parse("x+size=big").is_err());
    }
}
