//! The simulated backend's model: loaded models with LRU eviction, parallel
//! slots with a FIFO queue, a prefix cache, timing and faults. The HTTP
//! layer in `server.rs` only parses requests and formats responses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::config::{Faults, SimConfig, SimModel};
use super::text;

/// Why the sim refused a request.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The model is not on the sim's disk.
    #[error("model \"{0}\" not found, try pulling it first")]
    ModelNotFound(String),
    /// An injected failure (`--fault-error-rate`).
    #[error("simulated backend failure (injected fault)")]
    Injected,
}

/// A prompt split at message boundaries, hashed cumulatively so that a
/// conversation's earlier turns are a prefix of its later ones.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    /// `(hash of segments 0..=i, tokens in segments 0..=i)` for each segment.
    segments: Vec<(u64, u32)>,
    /// The last segment is a partial assistant reply that the output
    /// continues (as Ollama and llama-server continue a final assistant
    /// message).
    continues: bool,
}

impl Prompt {
    /// Appends one segment (a chat message, or a whole generate prompt).
    pub fn push(&mut self, role: &str, content: &str) {
        let (prev_hash, prev_tokens) = self.segments.last().copied().unwrap_or((0, 0));
        let hash = text::fnv1a(text::fnv1a(prev_hash, role.as_bytes()), content.as_bytes());
        self.segments.push((hash, prev_tokens + text::count_tokens(content)));
        self.continues = role == "assistant" && !content.is_empty();
    }

    /// Total prompt tokens.
    pub fn tokens(&self) -> u32 {
        self.segments.last().map_or(0, |s| s.1)
    }

    fn hash(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.0)
    }
}

/// What the response carries instead of plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputShape {
    /// Plain words.
    Text,
    /// A JSON object (`response_format` / Ollama `format`).
    Json,
    /// A call of the named tool.
    ToolCall(String),
}

/// One generation request, already parsed from whichever API it came in on.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// Model name as requested.
    pub model: String,
    /// The prompt, for token counts and the prefix cache.
    pub prompt: Prompt,
    /// Tokens to generate; the configured default when absent.
    pub max_tokens: Option<u32>,
    /// Shape of the output.
    pub shape: OutputShape,
}

/// Counters the sim exposes at `GET /sim/stats`, so tests can see what the
/// backend itself observed (cancellations, queueing, cache hits).
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    injected_errors: AtomicU64,
    in_flight: AtomicU64,
    queued: AtomicU64,
    loads: AtomicU64,
    evictions: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    /// Inference requests received.
    pub requests: u64,
    /// Requests whose response was fully produced.
    pub completed: u64,
    /// Requests abandoned by the client before they completed.
    pub cancelled: u64,
    /// Requests failed on purpose by the error-rate fault.
    pub injected_errors: u64,
    /// Requests holding a slot or waiting for one.
    pub in_flight: u64,
    /// Requests waiting for a slot.
    pub queued: u64,
    /// Cold loads performed.
    pub loads: u64,
    /// Models evicted to make room.
    pub evictions: u64,
    /// Prompt tokens received.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Models loaded now, most recently used last.
    pub loaded: Vec<String>,
}

/// Where a loaded model is kept: its slots and when it was last used.
struct Loaded {
    name: String,
    slots: Arc<Semaphore>,
    last_used: u64,
    /// When it was last loaded or used: Ollama's `expires_at` is this plus
    /// the keep-alive.
    used_at: SystemTime,
}

#[derive(Default)]
struct State {
    loaded: Vec<Loaded>,
    tick: u64,
    /// Per model: prefix hash → tick of last use.
    prefixes: HashMap<String, HashMap<u64, u64>>,
}

/// The last inference request received, kept so tests can check that the
/// agent forwarded the body byte for byte.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedRequest {
    /// Request path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The body as received, decoded as UTF-8 (lossy).
    pub body: String,
}

/// Index of `name` in `models`, accepting Ollama's implicit `:latest`.
fn find_model(models: &[SimModel], name: &str) -> Option<usize> {
    models.iter().position(|m| m.name == name || m.name.strip_suffix(":latest") == Some(name)).or_else(|| {
        let bare = name.strip_suffix(":latest")?;
        models.iter().position(|m| m.name == bare)
    })
}

/// The simulated backend.
pub struct SimEngine {
    /// Models on disk; pulls, copies and deletes change them.
    models: RwLock<Vec<SimModel>>,
    config: SimConfig,
    state: Mutex<State>,
    /// Like Ollama's scheduler, load one model at a time.
    load_lock: tokio::sync::Mutex<()>,
    faults: RwLock<Faults>,
    stats: Arc<Stats>,
    draws: AtomicU64,
    last_request: Mutex<Option<(String, Bytes)>>,
    started: Instant,
    started_at: SystemTime,
}

impl SimEngine {
    /// Builds a sim; fails on a bad model spec.
    pub fn new(config: SimConfig) -> Result<SimEngine, String> {
        let models = config.parsed_models()?;
        if models.is_empty() {
            return Err("the simulated backend needs at least one model".into());
        }
        let preload: Vec<String> = match &config.preload {
            Some(names) => names.clone(),
            None => models.iter().take(config.max_loaded).map(|m| m.name.clone()).collect(),
        };
        let mut state = State::default();
        for name in preload.iter().filter(|n| !n.is_empty()) {
            let model = models
                .iter()
                .find(|m| &m.name == name)
                .ok_or_else(|| format!("preloaded model '{name}' is not in --models"))?;
            state.tick += 1;
            state.loaded.push(Loaded {
                name: model.name.clone(),
                slots: Arc::new(Semaphore::new(config.slots.max(1) as usize)),
                last_used: state.tick,
                used_at: SystemTime::now(),
            });
        }
        Ok(SimEngine {
            faults: RwLock::new(config.faults.clone()),
            models: RwLock::new(models),
            config,
            state: Mutex::new(state),
            load_lock: tokio::sync::Mutex::new(()),
            stats: Arc::new(Stats::default()),
            draws: AtomicU64::new(0),
            last_request: Mutex::new(None),
            started: Instant::now(),
            started_at: SystemTime::now(),
        })
    }

    /// The configuration this sim runs with.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Models on disk.
    pub fn models(&self) -> Vec<SimModel> {
        self.models.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Finds a model by name, accepting Ollama's implicit `:latest`.
    pub fn model(&self, name: &str) -> Option<SimModel> {
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        find_model(&models, name).map(|i| models[i].clone())
    }

    /// Bytes the models on disk take.
    pub fn disk_used(&self) -> u64 {
        self.models.read().unwrap_or_else(PoisonError::into_inner).iter().map(|m| m.size_bytes).sum()
    }

    /// Puts `model` on disk (a finished pull, copy or create), replacing a
    /// model of the same name; fails when the disk would overflow.
    pub fn add_model(&self, model: SimModel) -> Result<(), String> {
        let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
        let existing = find_model(&models, &model.name);
        let used: u64 = models.iter().map(|m| m.size_bytes).sum::<u64>() - existing.map_or(0, |i| models[i].size_bytes);
        if let Some(disk) = self.config.disk_bytes
            && used + model.size_bytes > disk
        {
            return Err(format!(
                "no space left on device: {} needs {} bytes, {} of {} free",
                model.name,
                model.size_bytes,
                disk.saturating_sub(used),
                disk
            ));
        }
        match existing {
            Some(i) => models[i] = model,
            None => models.push(model),
        }
        Ok(())
    }

    /// Removes a model from disk (and from memory); `false` when absent.
    pub fn remove_model(&self, name: &str) -> bool {
        let removed = {
            let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
            find_model(&models, name).map(|i| models.remove(i))
        };
        let Some(removed) = removed else { return false };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.loaded.retain(|l| l.name != removed.name);
        state.prefixes.remove(&removed.name);
        true
    }

    /// Names of the models loaded now.
    pub fn loaded(&self) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut loaded: Vec<&Loaded> = state.loaded.iter().collect();
        loaded.sort_by_key(|l| l.last_used);
        loaded.iter().map(|l| l.name.clone()).collect()
    }

    /// Loaded models with when each was last used, least recent first.
    pub fn loaded_used_at(&self) -> Vec<(String, SystemTime)> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut loaded: Vec<&Loaded> = state.loaded.iter().collect();
        loaded.sort_by_key(|l| l.last_used);
        loaded.iter().map(|l| (l.name.clone(), l.used_at)).collect()
    }

    /// When the sim started, as the models' `modified_at` (a model file's
    /// time does not move while it sits on disk).
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// Seconds since the sim started; used for `created` timestamps' stability.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Replaces the active faults.
    pub fn set_faults(&self, faults: Faults) {
        *self.faults.write().unwrap_or_else(PoisonError::into_inner) = faults;
    }

    /// The active faults.
    pub fn faults(&self) -> Faults {
        self.faults.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Remembers the raw body of an inference request.
    pub fn record(&self, path: &str, body: &Bytes) {
        *self.last_request.lock().unwrap_or_else(PoisonError::into_inner) = Some((path.to_string(), body.clone()));
    }

    /// The last recorded request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        let last = self.last_request.lock().unwrap_or_else(PoisonError::into_inner);
        last.as_ref().map(|(path, body)| RecordedRequest {
            path: path.clone(),
            body: String::from_utf8_lossy(body).into_owned(),
        })
    }

    /// A copy of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: get(&s.requests),
            completed: get(&s.completed),
            cancelled: get(&s.cancelled),
            injected_errors: get(&s.injected_errors),
            in_flight: get(&s.in_flight),
            queued: get(&s.queued),
            loads: get(&s.loads),
            evictions: get(&s.evictions),
            prompt_tokens: get(&s.prompt_tokens),
            cached_prompt_tokens: get(&s.cached_prompt_tokens),
            completion_tokens: get(&s.completion_tokens),
            loaded: self.loaded(),
        }
    }

    /// A uniform draw in [0, 1), reproducible for a given seed and order.
    fn draw(&self) -> f64 {
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        (text::mix(self.config.seed ^ n.wrapping_mul(0x9e37)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Loads `model` if it is cold (evicting the least recently used model
    /// when memory is full) and returns its slots and the load time spent.
    pub async fn ensure_loaded(&self, model: &str) -> (Arc<Semaphore>, Duration) {
        if let Some(slots) = self.touch(model) {
            return (slots, Duration::ZERO);
        }
        let _loading = self.load_lock.lock().await;
        // Another request may have loaded it while this one waited.
        if let Some(slots) = self.touch(model) {
            return (slots, Duration::ZERO);
        }
        let began = Instant::now();
        if self.config.load_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.config.load_ms)).await;
        }
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        let slots = Arc::new(Semaphore::new(self.config.slots.max(1) as usize));
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while state.loaded.len() >= self.config.max_loaded.max(1) {
            let Some(lru) = state.loaded.iter().enumerate().min_by_key(|(_, l)| l.last_used).map(|(i, _)| i) else {
                break;
            };
            let evicted = state.loaded.swap_remove(lru);
            state.prefixes.remove(&evicted.name);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        state.tick += 1;
        let tick = state.tick;
        state.loaded.push(Loaded {
            name: model.to_string(),
            slots: slots.clone(),
            last_used: tick,
            used_at: SystemTime::now(),
        });
        (slots, began.elapsed())
    }

    fn touch(&self, model: &str) -> Option<Arc<Semaphore>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.tick += 1;
        let tick = state.tick;
        let loaded = state.loaded.iter_mut().find(|l| l.name == model)?;
        loaded.last_used = tick;
        loaded.used_at = SystemTime::now();
        Some(loaded.slots.clone())
    }

    /// Longest cached prefix of `prompt` in tokens; then remembers every
    /// prefix of it.
    fn use_prefix_cache(&self, model: &str, prompt: &Prompt) -> u32 {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.tick += 1;
        let tick = state.tick;
        let capacity = self.config.prefix_cache_entries;
        let cache = state.prefixes.entry(model.to_string()).or_default();
        let cached =
            prompt.segments.iter().rev().find(|(hash, _)| cache.contains_key(hash)).map_or(0, |(_, tokens)| *tokens);
        // Only the last `capacity` prefixes can stay (they all get the same
        // tick), so a prompt of 200k messages does not evict 200k times.
        let skip = prompt.segments.len().saturating_sub(capacity);
        for (hash, _) in prompt.segments.iter().skip(skip) {
            remember(cache, *hash, tick, capacity);
        }
        cached
    }

    fn remember_reply(&self, model: &str, prompt_hash: u64, reply: &str) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.tick += 1;
        let tick = state.tick;
        let capacity = self.config.prefix_cache_entries;
        let hash = text::fnv1a(text::fnv1a(prompt_hash, b"assistant"), reply.as_bytes());
        let cache = state.prefixes.entry(model.to_string()).or_default();
        remember(cache, hash, tick, capacity);
    }

    /// Accepts a request: applies faults, loads the model, waits for a slot
    /// and evaluates the prompt. The returned [`Run`] yields the tokens.
    pub async fn start(&self, req: GenRequest) -> Result<Run, SimError> {
        let began = Instant::now();
        let model = self.model(&req.model).ok_or_else(|| SimError::ModelNotFound(req.model.clone()))?.name;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut guard = RunGuard::new(self.stats.clone());
        let faults = self.faults();
        if faults.error_rate > 0.0 && self.draw() < faults.error_rate {
            guard.finished = true;
            self.stats.injected_errors.fetch_add(1, Ordering::Relaxed);
            return Err(SimError::Injected);
        }
        if faults.hang_rate > 0.0 && self.draw() < faults.hang_rate {
            // Hangs until the client gives up; the guard then counts a cancel.
            std::future::pending::<()>().await;
        }
        let (slots, load) = self.ensure_loaded(&model).await;
        // Counted as queued only when it really waits for a slot.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(_) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                let permit = slots.acquire_owned().await;
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                permit
            }
        };
        let Ok(permit) = permit else {
            // The semaphore is never closed; treat it as a bug, not a hang.
            guard.finished = true;
            return Err(SimError::Injected);
        };
        let prompt_tokens = req.prompt.tokens();
        let cached = self.use_prefix_cache(&model, &req.prompt);
        let eval_began = Instant::now();
        if self.config.prompt_tps > 0.0 {
            let uncached = f64::from(prompt_tokens.saturating_sub(cached));
            tokio::time::sleep(Duration::from_secs_f64(uncached / self.config.prompt_tps)).await;
        }
        let prompt_eval = eval_began.elapsed();
        let seed = self.config.seed ^ req.prompt.hash() ^ text::fnv1a(0, model.as_bytes());
        let n = req.max_tokens.unwrap_or(self.config.output_tokens);
        let tokens = match &req.shape {
            // A continued reply goes on after its last word.
            OutputShape::Text if req.prompt.continues => {
                let mut tokens = text::generate_tokens(seed, n);
                if let Some(first) = tokens.first_mut().filter(|t| !t.starts_with(' ')) {
                    first.insert(0, ' ');
                }
                tokens
            }
            OutputShape::Text => text::generate_tokens(seed, n),
            OutputShape::Json => {
                let mut words = text::generate_tokens(seed, n.saturating_sub(2).max(1));
                words.insert(0, "{\"answer\": \"".to_string());
                words.push("\"}".to_string());
                words
            }
            OutputShape::ToolCall(_) => Vec::new(),
        };
        let completion_tokens = match req.shape {
            OutputShape::ToolCall(_) => 1,
            _ => tokens.len() as u32,
        };
        self.stats.prompt_tokens.fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
        self.stats.cached_prompt_tokens.fetch_add(u64::from(cached), Ordering::Relaxed);
        Ok(Run {
            model,
            truncated: req.max_tokens.is_some_and(|m| m == completion_tokens),
            shape: req.shape,
            tokens,
            next: 0,
            prompt_tokens,
            cached_tokens: cached,
            completion_tokens,
            decode_tps: self.config.decode_tps,
            drop_after: faults.drop_after_tokens,
            prompt_hash: req.prompt.hash(),
            began,
            load,
            prompt_eval,
            decode_began: Instant::now(),
            permit: Some(permit),
            guard,
        })
    }

    /// Counts a finished run and caches its prompt plus reply as a prefix.
    pub fn finish(&self, mut run: Run) {
        run.guard.finished = true;
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        self.stats.completion_tokens.fetch_add(u64::from(run.completion_tokens), Ordering::Relaxed);
        if run.shape != OutputShape::Text {
            return;
        }
        self.remember_reply(&run.model, run.prompt_hash, &run.tokens.concat());
    }

    /// Counts an embedding request (no slots: embeddings are fast and Ollama
    /// batches them).
    pub fn count_embedding(&self, tokens: u32) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        self.stats.prompt_tokens.fetch_add(u64::from(tokens), Ordering::Relaxed);
    }

    /// Draws the error fault for requests that do not go through [`Self::start`].
    pub fn injected_error(&self) -> bool {
        let faults = self.faults();
        let hit = faults.error_rate > 0.0 && self.draw() < faults.error_rate;
        if hit {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.injected_errors.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }
}

fn remember(cache: &mut HashMap<u64, u64>, hash: u64, tick: u64, capacity: usize) {
    if capacity == 0 {
        return;
    }
    if cache.len() >= capacity
        && !cache.contains_key(&hash)
        && let Some(oldest) = cache.iter().min_by_key(|(_, t)| **t).map(|(h, _)| *h)
    {
        cache.remove(&oldest);
    }
    cache.insert(hash, tick);
}

/// Keeps `in_flight` honest and counts a cancellation when a run is dropped
/// before it finished (the client went away).
struct RunGuard {
    stats: Arc<Stats>,
    finished: bool,
}

impl RunGuard {
    fn new(stats: Arc<Stats>) -> RunGuard {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        RunGuard { stats, finished: false }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The connection was dropped on purpose (`--fault-drop-after`).
#[derive(Debug)]
pub struct Dropped;

/// An accepted request holding a slot, yielding its tokens at decode speed.
pub struct Run {
    /// Canonical model name.
    pub model: String,
    /// Output shape.
    pub shape: OutputShape,
    /// Whether generation stopped at the client's max tokens.
    pub truncated: bool,
    tokens: Vec<String>,
    next: usize,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    decode_tps: f64,
    drop_after: Option<u32>,
    prompt_hash: u64,
    began: Instant,
    /// Time spent loading the model.
    pub load: Duration,
    /// Time spent evaluating the prompt.
    pub prompt_eval: Duration,
    decode_began: Instant,
    /// The slot, freed when the last token is out (as a real server frees
    /// it before the response's closing bytes reach the client).
    permit: Option<OwnedSemaphorePermit>,
    guard: RunGuard,
}

impl Run {
    /// The next token, after waiting for its decode time; `None` at the end.
    pub async fn next_token(&mut self) -> Option<Result<String, Dropped>> {
        if self.next >= self.tokens.len() {
            self.permit = None;
            return None;
        }
        if self.drop_after.is_some_and(|n| self.next >= n as usize) {
            return Some(Err(Dropped));
        }
        if self.decode_tps > 0.0 {
            let due = self.decode_began + Duration::from_secs_f64((self.next + 1) as f64 / self.decode_tps);
            tokio::time::sleep_until(due.into()).await;
        }
        self.next += 1;
        Some(Ok(self.tokens[self.next - 1].clone()))
    }

    /// All remaining tokens concatenated.
    pub async fn collect(&mut self) -> Result<String, Dropped> {
        let mut out = String::new();
        while let Some(token) = self.next_token().await {
            out.push_str(&token?);
        }
        Ok(out)
    }

    /// Time since the request arrived.
    pub fn total(&self) -> Duration {
        self.began.elapsed()
    }

    /// Time spent decoding so far.
    pub fn decode_time(&self) -> Duration {
        self.decode_began.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(config: SimConfig) -> SimEngine {
        SimEngine::new(config).expect("valid config")
    }

    fn chat(model: &str, turns: &[&str]) -> GenRequest {
        let mut prompt = Prompt::default();
        for t in turns {
            prompt.push("user", t);
        }
        GenRequest { model: model.into(), prompt, max_tokens: Some(4), shape: OutputShape::Text }
    }

    #[tokio::test]
    async fn usage_matches_generated_tokens() {
        let sim = engine(SimConfig::default());
        let mut run = sim.start(chat("qwen2.5:7b", &["hello there world"])).await.expect("starts");
        let text = run.collect().await.expect("no drop");
        assert_eq!(text::count_tokens(&text), 4);
        assert_eq!(run.prompt_tokens, 3);
        assert_eq!(run.completion_tokens, 4);
        assert!(run.truncated);
        sim.finish(run);
        let stats = sim.stats();
        assert_eq!((stats.completed, stats.cancelled, stats.in_flight), (1, 0, 0));
    }

    #[tokio::test]
    async fn dropping_a_run_counts_a_cancel() {
        let sim = engine(SimConfig::default());
        let run = sim.start(chat("qwen2.5:7b", &["hi"])).await.expect("starts");
        drop(run);
        assert_eq!(sim.stats().cancelled, 1);
    }

    #[tokio::test]
    async fn second_turn_hits_the_prefix_cache() {
        let sim = engine(SimConfig::default());
        let mut first = sim.start(chat("qwen2.5:7b", &["one two three"])).await.expect("starts");
        let reply = first.collect().await.expect("no drop");
        assert_eq!(first.cached_tokens, 0);
        sim.finish(first);
        let mut prompt = Prompt::default();
        prompt.push("user", "one two three");
        prompt.push("assistant", &reply);
        prompt.push("user", "four");
        let req = GenRequest { model: "qwen2.5:7b".into(), prompt, max_tokens: None, shape: OutputShape::Text };
        let second = sim.start(req).await.expect("starts");
        assert_eq!(second.cached_tokens, 3 + 4);
    }

    #[tokio::test]
    async fn loading_beyond_capacity_evicts_the_least_recently_used() {
        let sim = engine(SimConfig {
            models: vec!["a:1b".into(), "b:1b".into(), "c:1b".into()],
            max_loaded: 2,
            ..SimConfig::default()
        });
        assert_eq!(sim.loaded(), vec!["a:1b", "b:1b"]);
        sim.ensure_loaded("a:1b").await;
        sim.ensure_loaded("c:1b").await;
        assert_eq!(sim.loaded(), vec!["a:1b", "c:1b"]);
        assert_eq!(sim.stats().evictions, 1);
    }

    #[tokio::test]
    async fn slots_bound_concurrency() {
        let sim = Arc::new(engine(SimConfig { slots: 1, ..SimConfig::default() }));
        let first = sim.start(chat("qwen2.5:7b", &["a"])).await.expect("starts");
        let waiting = tokio::spawn({
            let sim = sim.clone();
            async move { sim.start(chat("qwen2.5:7b", &["b"])).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        for _ in 0..100 {
            if sim.stats().queued == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(sim.stats().queued, 1);
        drop(first);
        waiting.await.expect("joins").expect("starts once the slot frees");
    }

    #[tokio::test]
    async fn faults_fail_and_drop() {
        let sim = engine(SimConfig::default());
        sim.set_faults(Faults { error_rate: 1.0, ..Faults::default() });
        assert!(matches!(sim.start(chat("qwen2.5:7b", &["x"])).await, Err(SimError::Injected)));
        sim.set_faults(Faults { drop_after_tokens: Some(2), ..Faults::default() });
        let mut run = sim.start(chat("qwen2.5:7b", &["x"])).await.expect("starts");
        assert!(run.next_token().await.is_some_and(|t| t.is_ok()));
        assert!(run.next_token().await.is_some_and(|t| t.is_ok()));
        assert!(run.next_token().await.is_some_and(|t| t.is_err()));
    }

    #[test]
    fn implicit_latest_tag_resolves() {
        let sim = engine(SimConfig { models: vec!["phi3:latest".into(), "qwen:7b".into()], ..SimConfig::default() });
        assert!(sim.model("phi3").is_some());
        assert!(sim.model("qwen:7b").is_some());
        assert!(sim.model("missing").is_none());
    }
}
