//! What a results folder was made from: the run's metadata (written at the top of
//! `results.json` and `report.md`) and the resume key derived from it. A folder is resumed
//! only by a run with the same key; anything else would mix results of different runs.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// The file as given, or the name of the built-in or synthetic set.
    pub name: String,
    /// Items sent per configuration (after `--limit`), before repeats.
    pub items: usize,
    /// [`crate::dataset::content_hash`] of those items.
    pub sha256: String,
    pub limit: Option<usize>,
    pub synthetic: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    /// A hash of what identifies the model's outputs (see the binary for what goes in).
    pub sha256: String,
    /// Response length when a configuration gives none (the generation config's).
    pub default_max_new_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// `in-process` or `router`.
    pub kind: String,
    pub url: Option<String>,
    /// The server's `GetModelInfo` answer, for a router.
    pub server: Option<serde_json::Value>,
}

/// The run's metadata. Field order is the order in the outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub title: String,
    pub command_line: String,
    /// UTC, ISO 8601.
    pub date: String,
    pub software: String,
    pub seed: u64,
    pub dataset: DatasetInfo,
    pub model: ModelInfo,
    pub target: TargetInfo,
    /// Each item is sent this many times per configuration.
    pub repeats: usize,
    /// Unrecorded requests sent before each configuration.
    pub warmup: usize,
    /// Latency objective for goodput, in milliseconds.
    pub slo_ms: Option<f64>,
}

/// What must match for a folder to be resumed: name -> value.
pub type ResumeKey = BTreeMap<String, String>;

impl Metadata {
    /// Everything in the metadata that changes a configuration's records. The grid point
    /// itself (decoding settings, load, seed) is in each configuration's key; the SLO is not
    /// here because goodput is recomputed from the records.
    pub fn resume_key(&self) -> ResumeKey {
        let opt = |v: Option<usize>| v.map_or("none".to_string(), |n| n.to_string());
        [
            ("dataset items", self.dataset.items.to_string()),
            ("dataset sha256", self.dataset.sha256.clone()),
            ("limit", opt(self.dataset.limit)),
            ("synthetic", opt(self.dataset.synthetic)),
            ("model", self.model.name.clone()),
            ("model sha256", self.model.sha256.clone()),
            (
                "target",
                match &self.target.url {
                    Some(u) => format!("{} {u}", self.target.kind),
                    None => self.target.kind.clone(),
                },
            ),
            ("repeats", self.repeats.to_string()),
            ("warmup", self.warmup.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// The differences between a folder's key and this run's, one `name: was X, now Y` each.
pub fn key_differences(saved: &ResumeKey, now: &ResumeKey) -> Vec<String> {
    let names: std::collections::BTreeSet<&String> = saved.keys().chain(now.keys()).collect();
    names
        .into_iter()
        .filter(|n| saved.get(*n) != now.get(*n))
        .map(|n| {
            let show = |v: Option<&String>| v.map_or("(absent)".to_string(), Clone::clone);
            format!("{n}: was {}, now {}", show(saved.get(n)), show(now.get(n)))
        })
        .collect()
}

/// SHA-256 over named parts, each framed by its name and length so that no two different
/// sequences of parts hash alike.
#[derive(Default)]
pub struct PartsHash(sha2::Sha256);

impl PartsHash {
    pub fn add(&mut self, name: &str, bytes: &[u8]) {
        use sha2::Digest;
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// The digest in lower-case hexadecimal.
    pub fn finish(self) -> String {
        use sha2::Digest;
        crate::dataset::hex(&self.0.finalize())
    }
}

/// Seconds since the Unix epoch as a UTC calendar date and time.
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a proleptic Gregorian date, counting in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2026-12-01T01:02:03Z`.
pub fn iso_date(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `20261201-010203`, for folder names.
pub fn stamp(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// The current time as [`iso_date`] and [`stamp`].
pub fn now() -> (String, String) {
    let s = now_secs();
    (iso_date(s), stamp(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_dates() {
        assert_eq!(iso_date(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day in a century leap year), 12:34:56.
        assert_eq!(iso_date(951_827_696), "2000-02-29T12:34:56Z");
        assert_eq!(iso_date(1_780_272_000), "2026-06-01T00:00:00Z");
        assert_eq!(stamp(951_827_696), "20000229-123456");
    }

    #[test]
    fn differences_name_each_changed_setting() {
        let mut a = ResumeKey::new();
        a.insert("limit".into(), "20".into());
        a.insert("model".into(), "m".into());
        let mut b = a.clone();
        b.insert("limit".into(), "100".into());
        assert_eq!(key_differences(&a, &b), vec!["limit: was 20, now 100"]);
        assert!(key_differences(&a, &a).is_empty());
    }
}
