//! raft-rs logs through slog; this drain hands its records to `tracing`.

use slog::{Drain, Level, OwnedKVList, Record};

/// A slog drain that writes to `tracing` under the `raft` target.
pub struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, _values: &OwnedKVList) -> Result<(), slog::Never> {
        let message = record.msg().to_string();
        let mut fields = String::new();
        let mut serializer = KvText(&mut fields);
        let _ = slog::KV::serialize(&record.kv(), record, &mut serializer);
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{message}{fields}"),
            Level::Warning => tracing::warn!(target: "raft", "{message}{fields}"),
            Level::Info => tracing::info!(target: "raft", "{message}{fields}"),
            Level::Debug | Level::Trace => tracing::debug!(target: "raft", "{message}{fields}"),
        }
        Ok(())
    }
}

struct KvText<'a>(&'a mut String);

impl slog::Serializer for KvText<'_> {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments<'_>) -> slog::Result {
        self.0.push_str(&format!(" {key}={value}"));
        Ok(())
    }
}

/// The logger raft-rs gets.
pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}
