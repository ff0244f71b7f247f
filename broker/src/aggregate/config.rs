//! `[[aggregate]]` entries: a derived topic of per-key tumbling windows over a source topic,
//! every limit named and validated with its key.

use serde::{Deserialize, Serialize};

use crate::config::{check_range, ConfigError};

/// Most `[[aggregate]]` entries (each is a task reading its source).
pub const AGGREGATES_MAX: usize = 64;
/// Most fields one entry aggregates (each costs 40 bytes per open window).
pub const FIELDS_MAX: usize = 32;
/// Longest JSON field name in `fields`, `key_field` or `time_field`.
pub const FIELD_NAME_BYTES_MAX: usize = 256;

/// One derived topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateConfig {
    /// The topic whose records (JSON objects) are aggregated, all its partitions.
    pub source: String,
    /// The derived topic results are appended to (created with one partition if absent).
    pub derived: String,
    /// Window length; windows are aligned to the epoch.
    pub window_ms: u64,
    /// How long after a window's end (by stream time, the largest event time seen) it still
    /// takes records; its result is emitted once this has passed.
    pub lateness_ms: u64,
    /// Numeric JSON fields aggregated (count, min, max, mean, last of each).
    pub fields: Vec<String>,
    /// JSON field holding the device key (a string or number); empty: the record key, as the
    /// MQTT routes write it.
    pub key_field: String,
    /// JSON field holding the event time (integer ms since the epoch); empty: the record
    /// timestamp.
    pub time_field: String,
    /// Open windows (keys x windows) held at once; a reading for another window is dropped and
    /// counted while this many are open. Bounds memory (about 100 B + 40 B per field each).
    pub windows_open_max: u32,
    /// Longest device key; readings with longer keys are skipped and counted.
    pub key_bytes_max: u32,
    /// Largest record value parsed as JSON; larger ones are skipped and counted.
    pub record_bytes_max: u32,
    /// Source records read per step before the aggregator yields (bounded work per step).
    pub records_per_step_max: u32,
    /// Results appended in one commit (with the state that says they were emitted).
    pub results_per_commit_max: u32,
    /// Longest time between checkpoints of the open windows and input position while records
    /// arrive: what a restart re-reads at most.
    pub checkpoint_interval_ms: u64,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self {
            source: String::new(),
            derived: String::new(),
            window_ms: 15 * 60 * 1000,
            lateness_ms: 60 * 1000,
            fields: Vec::new(),
            key_field: String::new(),
            time_field: String::new(),
            windows_open_max: 10_000,
            key_bytes_max: 256,
            record_bytes_max: 64 * 1024,
            records_per_step_max: 1024,
            results_per_commit_max: 256,
            checkpoint_interval_ms: 1000,
        }
    }
}

impl AggregateConfig {
    /// Validates one entry; `prefix` is its key (`aggregate[0]`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let range = |k: &str, v: u64, lo: u64, hi: u64| check_range(&key(k), v, lo, hi);
        for (k, name) in [("source", &self.source), ("derived", &self.derived)] {
            crate::storage::validate_topic_name(name).map_err(|e| ConfigError::new(key(k), e.to_string()))?;
        }
        if self.source == self.derived {
            return Err(ConfigError::new(key("derived"), "must differ from source"));
        }
        // A year: windows longer than that hold state for longer than any retention here.
        range("window_ms", self.window_ms, 1, 366 * 86_400_000)?;
        range("lateness_ms", self.lateness_ms, 0, 366 * 86_400_000)?;
        range("windows_open_max", self.windows_open_max.into(), 1, 10_000_000)?;
        range("key_bytes_max", self.key_bytes_max.into(), 1, 65_535)?;
        range("record_bytes_max", self.record_bytes_max.into(), 64, 16 * 1024 * 1024)?;
        range("records_per_step_max", self.records_per_step_max.into(), 1, 1_000_000)?;
        range("results_per_commit_max", self.results_per_commit_max.into(), 1, 100_000)?;
        range("checkpoint_interval_ms", self.checkpoint_interval_ms, 10, 3_600_000)?;
        if self.fields.is_empty() || self.fields.len() > FIELDS_MAX {
            return Err(ConfigError::new(
                key("fields"),
                format!("must name between 1 and {FIELDS_MAX} fields (got {})", self.fields.len()),
            ));
        }
        let names = self.fields.iter().map(|f| ("fields", f));
        let optional = [("key_field", &self.key_field), ("time_field", &self.time_field)];
        for (k, name) in names.chain(optional.into_iter().filter(|(_, n)| !n.is_empty())) {
            if name.is_empty() || name.len() > FIELD_NAME_BYTES_MAX {
                return Err(ConfigError::new(
                    key(k),
                    format!("a field name has 1 to {FIELD_NAME_BYTES_MAX} bytes (got {name:?})"),
                ));
            }
        }
        for (i, f) in self.fields.iter().enumerate() {
            if self.fields[..i].contains(f) {
                return Err(ConfigError::new(key("fields"), format!("{f:?} named twice")));
            }
        }
        Ok(())
    }
}

impl AggregateConfig {
    /// An upper bound of one result record's encoded size: the record envelope and the JSON
    /// numbers (at most 25 characters each), the key, and per field its name (escaped, at most
    /// 6 bytes per byte) and four named numbers.
    pub fn result_bytes_max(&self) -> u64 {
        let fields: u64 = self.fields.iter().map(|f| 6 * f.len() as u64 + 4 * 40 + 16).sum();
        160 + u64::from(self.key_bytes_max) + fields
    }
}

/// Checks that a commit's results fit one append (`storage.append_size_bytes_max`).
pub fn validate_with_storage(
    entries: &[AggregateConfig],
    prefix: &str,
    storage: &crate::config::StorageConfig,
) -> Result<(), ConfigError> {
    for (i, e) in entries.iter().enumerate() {
        let bytes = u64::from(e.results_per_commit_max) * e.result_bytes_max();
        if bytes > u64::from(storage.append_size_bytes_max) {
            return Err(ConfigError::new(
                format!("{prefix}[{i}].results_per_commit_max"),
                format!(
                    "{} results of up to {} B each (key_bytes_max, fields) may exceed storage.append_size_bytes_max = {}",
                    e.results_per_commit_max,
                    e.result_bytes_max(),
                    storage.append_size_bytes_max
                ),
            ));
        }
    }
    Ok(())
}

/// Validates all entries (`aggregate[i]`): each alone, their count, and that no two write the
/// same derived topic and no derived topic is another's source.
pub fn validate_all(entries: &[AggregateConfig], prefix: &str) -> Result<(), ConfigError> {
    if entries.len() > AGGREGATES_MAX {
        return Err(ConfigError::new(prefix, format!("at most {AGGREGATES_MAX} entries (got {})", entries.len())));
    }
    for (i, e) in entries.iter().enumerate() {
        let at = format!("{prefix}[{i}]");
        e.validate(&at)?;
        if entries[..i].iter().any(|o| o.derived == e.derived) {
            return Err(ConfigError::new(
                format!("{at}.derived"),
                format!("{:?} is derived by an earlier entry", e.derived),
            ));
        }
        if entries.iter().any(|o| o.source == e.derived) {
            return Err(ConfigError::new(format!("{at}.derived"), format!("{:?} is an entry's source", e.derived)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> AggregateConfig {
        AggregateConfig {
            source: "meters".into(),
            derived: "meters.15m".into(),
            fields: vec!["kw".into()],
            ..Default::default()
        }
    }

    #[test]
    fn errors_name_the_key() {
        assert!(validate_all(&[entry()], "aggregate").is_ok());
        type Change = fn(&mut AggregateConfig);
        let cases: Vec<(Change, &str)> = vec![
            (|c| c.source = String::new(), "aggregate[0].source"),
            (|c| c.derived = "meters".into(), "aggregate[0].derived"),
            (|c| c.window_ms = 0, "aggregate[0].window_ms"),
            (|c| c.windows_open_max = 0, "aggregate[0].windows_open_max"),
            (|c| c.key_bytes_max = 0, "aggregate[0].key_bytes_max"),
            (|c| c.record_bytes_max = 1, "aggregate[0].record_bytes_max"),
            (|c| c.records_per_step_max = 0, "aggregate[0].records_per_step_max"),
            (|c| c.results_per_commit_max = 0, "aggregate[0].results_per_commit_max"),
            (|c| c.checkpoint_interval_ms = 0, "aggregate[0].checkpoint_interval_ms"),
            (|c| c.fields.clear(), "aggregate[0].fields"),
            (|c| c.fields = vec!["a".into(), "a".into()], "aggregate[0].fields"),
            (|c| c.fields = vec!["f".into(); FIELDS_MAX + 1], "aggregate[0].fields"),
            (|c| c.key_field = "x".repeat(FIELD_NAME_BYTES_MAX + 1), "aggregate[0].key_field"),
        ];
        for (change, key) in cases {
            let mut c = entry();
            change(&mut c);
            let e = validate_all(&[c], "aggregate").expect_err(key);
            assert_eq!(e.key, key, "{e}");
        }
        let e = validate_all(&[entry(), entry()], "aggregate").expect_err("same derived topic twice");
        assert_eq!(e.key, "aggregate[1].derived");
        let chained = AggregateConfig { source: "meters.15m".into(), derived: "meters.1d".into(), ..entry() };
        let e = validate_all(&[entry(), chained], "aggregate").expect_err("derived of a derived");
        assert_eq!(e.key, "aggregate[0].derived");
        let e = validate_all(&vec![entry(); AGGREGATES_MAX + 1], "aggregate").expect_err("too many");
        assert_eq!(e.key, "aggregate");
        let storage = crate::config::StorageConfig::default();
        assert!(validate_with_storage(&[entry()], "aggregate", &storage).is_ok(), "the defaults fit");
        let wide = AggregateConfig { fields: (0..FIELDS_MAX).map(|i| format!("f{i:0>200}")).collect(), ..entry() };
        let e = validate_with_storage(&[entry(), wide], "aggregate", &storage).expect_err("results too large");
        assert_eq!(e.key, "aggregate[1].results_per_commit_max");
    }
}
