//! A topic's settings: one [`TopicConfig`], carried whole from the create or alter
//! request through the metadata log to every partition.
//!
//! Every field is declared once, in the `topic_config!` table below, with its default,
//! its bounds and a doc line; the struct, the partial [`TopicConfigPatch`] a request
//! sends, validation and the documentation table are generated from it.
//!
//! **Encoding.** Inside postcard bodies (requests, responses, metadata commands) a
//! config or a patch travels as a JSON string (the `as_json` / `patch_as_json` serde
//! adapters): JSON names its fields, so a field added later is simply absent from old
//! encodings and takes its default, and metadata logs written before it still load.
//! Postcard alone is positional and would not allow that.

use serde::{Deserialize, Serialize};

use crate::limits::BATCH_SIZE_MAX;

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Why a topic configuration (or a patch of one) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicConfigError {
    #[error("topic setting {field} = {value} is outside {min}..={max}")]
    OutOfRange { field: &'static str, value: u64, min: u64, max: u64 },
    #[error("topic settings conflict: {0}")]
    Conflict(String),
    #[error("topic settings do not parse: {0}; known settings: {known}", known = TopicConfig::FIELD_NAMES.join(", "))]
    Unparseable(String),
}

/// Declares a settings struct (every field with default, bounds and doc), its partial
/// patch, validation and the documentation table. Used for topic and group settings.
macro_rules! settings {
    (
        $(#[doc = $cdoc:literal])+
        $config:ident, $patch:ident;
        $(
            $(#[doc = $doc:literal])+
            $name:ident : $ty:ty = $default:expr, $min:expr, $max:expr;
        )+
    ) => {
        $(#[doc = $cdoc])+
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct $config {
            $( $(#[doc = $doc])+ pub $name: $ty, )+
        }

        impl Default for $config {
            fn default() -> Self {
                $config { $( $name: $default, )+ }
            }
        }

        /// Some settings, to set on top of the defaults (create) or of the current
        /// settings (alter). An unknown setting is refused, not ignored.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $patch {
            $( $(#[doc = $doc])+ #[serde(default, skip_serializing_if = "Option::is_none")] pub $name: Option<$ty>, )+
        }

        impl $config {
            /// Every setting's name, in declaration order.
            pub const FIELD_NAMES: &'static [&'static str] = &[$( stringify!($name), )+];

            /// Every setting: name, default, minimum, maximum, doc line.
            pub fn describe_fields() -> Vec<(&'static str, u64, u64, u64, &'static str)> {
                vec![$( (stringify!($name), ($default) as u64, ($min) as u64, ($max) as u64, concat!($($doc),+).trim()), )+]
            }

            /// Checks every setting against its bounds, and the settings against each other.
            pub fn validate(&self) -> Result<(), TopicConfigError> {
                $(
                    let value = self.$name as u64;
                    if value < ($min) as u64 || value > ($max) as u64 {
                        return Err(TopicConfigError::OutOfRange { field: stringify!($name), value, min: ($min) as u64, max: ($max) as u64 });
                    }
                )+
                self.check_relations()
            }

            /// This config with the patch's settings applied (not validated).
            pub fn patched(&self, patch: &$patch) -> $config {
                let mut config = self.clone();
                $( if let Some(v) = patch.$name { config.$name = v; } )+
                config
            }
        }

        impl $patch {
            /// Whether the patch sets nothing.
            pub fn is_empty(&self) -> bool {
                true $( && self.$name.is_none() )+
            }
        }
    };
}

settings! {
    /// A topic's settings. Every node folds the same config from the metadata log;
    /// settings that applying a partition's log depends on reach the partition as a
    /// log entry of its own (see `broker/src/partition`).
    TopicConfig, TopicConfigPatch;
    /// Largest record batch a producer may send, in bytes (also the largest message).
    max_message_bytes: u32 = 1024 * 1024, 1024, BATCH_SIZE_MAX;
    /// How long messages are kept, in milliseconds; 0 keeps them forever. Judged by the
    /// partition leader's clock when each message was stored (never producers' clocks),
    /// a whole segment at a time.
    retention_ms: u64 = 0, 0, u64::MAX;
    /// Most bytes each partition keeps (per replica); 0 keeps everything. Whole segments
    /// go, oldest first, so a partition holds at most this plus one segment.
    retention_bytes: u64 = 0, 0, u64::MAX;
    /// Size at which a partition's active segment file is closed and a new one started
    /// (retention deletes whole segments).
    segment_bytes: u64 = 128 * 1024 * 1024, 64 * 1024, 1024 * 1024 * 1024;
    /// How long a message id is remembered after its first sighting, in milliseconds: a
    /// message carrying an id seen within this window is not stored again.
    dedupe_window_ms: u64 = 2 * MINUTE_MS, 100, DAY_MS;
    /// Most message ids one partition remembers at once (about 70 bytes of memory each).
    /// When full, publishes carrying ids are throttled until old ids leave the window.
    dedupe_ids_max: u64 = 1_000_000, 1_000, 50_000_000;
    /// How long an idempotent producer's state is kept after its last write, in
    /// milliseconds. A producer idle longer starts a new epoch on its next write.
    producer_expiry_ms: u64 = DAY_MS, MINUTE_MS, 30 * DAY_MS;
    /// Deliveries of a message to a queue group before it is dead-lettered (a lease
    /// that expires counts as a delivery).
    max_deliveries: u32 = 5, 1, 100;
    /// Priority lanes (queue mode): a producer may send to lanes `0..priorities`; higher
    /// lanes are delivered first, by weight (see `priority_weight_step`).
    priorities: u32 = 1, 1, 10;
    /// Weight of lane L in queue delivery: `1 + priority_weight_step × L`. When several
    /// lanes have messages waiting, each gets deliveries in proportion to its weight
    /// (smooth weighted round robin), so lower lanes never starve; 0 serves all lanes
    /// equally.
    priority_weight_step: u32 = 1, 0, 1_000;
}

impl TopicConfig {
    /// The delivery weight of priority lane `lane`.
    pub fn lane_weight(&self, lane: u8) -> u64 {
        1 + u64::from(self.priority_weight_step) * u64::from(lane)
    }
}

settings! {
    /// A consumer group's settings (queue mode: leases, retries, in-flight bound), kept
    /// in the metadata log; a group without settings of its own uses the defaults.
    GroupConfig, GroupConfigPatch;
    /// How long a member holds a leased message before it is delivered again, in
    /// milliseconds (extended by the member's `extend`).
    lease_timeout_ms: u64 = 30 * SECOND_MS, SECOND_MS, 12 * HOUR_MS;
    /// First retry delay after a nack, in milliseconds; each further attempt multiplies
    /// it by `retry_multiplier`, up to `retry_max_ms`. The delay is drawn uniformly from
    /// zero to that bound (full jitter).
    retry_base_ms: u64 = SECOND_MS, 10, 10 * MINUTE_MS;
    /// Growth of the retry delay per attempt.
    retry_multiplier: u32 = 2, 1, 10;
    /// Longest retry delay, in milliseconds.
    retry_max_ms: u64 = 10 * MINUTE_MS, 10, DAY_MS;
    /// Leased, unsettled messages one member may hold per partition; beyond it the
    /// member is sent nothing more from that partition until it settles some.
    max_unacked: u32 = 1_000, 1, 100_000;
    /// 1: ordered by key — at most one message per key is out (leased or waiting for a
    /// retry) at a time; the key's later messages wait behind it, and a key whose
    /// message keeps failing is parked while other keys flow. 0: no key order.
    ordered: u32 = 0, 0, 1;
}

impl GroupConfig {
    fn check_relations(&self) -> Result<(), TopicConfigError> {
        if self.retry_base_ms > self.retry_max_ms {
            return Err(TopicConfigError::Conflict(format!("retry_base_ms ({}) is above retry_max_ms ({})", self.retry_base_ms, self.retry_max_ms)));
        }
        Ok(())
    }

    /// The upper bound of the retry delay after `attempt` deliveries (1 = the first):
    /// `retry_base_ms × retry_multiplier^(attempt-1)`, at most `retry_max_ms`. The
    /// delay itself is drawn from `0..=bound` (full jitter).
    pub fn retry_bound_ms(&self, attempt: u32) -> u64 {
        let mut bound = self.retry_base_ms;
        for _ in 1..attempt {
            bound = bound.saturating_mul(u64::from(self.retry_multiplier));
            if bound >= self.retry_max_ms {
                break;
            }
        }
        bound.min(self.retry_max_ms)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a group config always encodes as JSON")
    }

    pub fn from_json(json: &str) -> Result<GroupConfig, TopicConfigError> {
        serde_json::from_str(json).map_err(|e| TopicConfigError::Unparseable(e.to_string()))
    }
}

impl GroupConfigPatch {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a group config patch always encodes as JSON")
    }

    pub fn from_json(json: &str) -> Result<GroupConfigPatch, TopicConfigError> {
        serde_json::from_str(json).map_err(|e| TopicConfigError::Unparseable(e.to_string()))
    }
}

impl TopicConfig {
    fn check_relations(&self) -> Result<(), TopicConfigError> {
        if self.retention_ms > 0 && self.dedupe_window_ms > self.retention_ms {
            return Err(TopicConfigError::Conflict(format!(
                "dedupe_window_ms ({}) is longer than retention_ms ({}): ids would outlive their messages",
                self.dedupe_window_ms, self.retention_ms
            )));
        }
        Ok(())
    }

    /// The config as a JSON object (its encoding inside postcard bodies).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a topic config always encodes as JSON")
    }

    /// Parses a JSON config; settings it lacks take their defaults, settings this build
    /// does not know (written by a newer one) are ignored.
    pub fn from_json(json: &str) -> Result<TopicConfig, TopicConfigError> {
        serde_json::from_str(json).map_err(|e| TopicConfigError::Unparseable(e.to_string()))
    }
}

impl TopicConfigPatch {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a topic config patch always encodes as JSON")
    }

    /// Parses a JSON patch; an unknown setting is an error naming it.
    pub fn from_json(json: &str) -> Result<TopicConfigPatch, TopicConfigError> {
        serde_json::from_str(json).map_err(|e| TopicConfigError::Unparseable(e.to_string()))
    }
}

/// Serde adapter: a [`TopicConfig`] as a JSON string (for postcard bodies).
pub mod as_json {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::TopicConfig;

    pub fn serialize<S: Serializer>(config: &TopicConfig, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&config.to_json())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TopicConfig, D::Error> {
        let json = String::deserialize(d)?;
        TopicConfig::from_json(&json).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: a [`TopicConfigPatch`] as a JSON string (for postcard bodies).
pub mod patch_as_json {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::TopicConfigPatch;

    pub fn serialize<S: Serializer>(patch: &TopicConfigPatch, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&patch.to_json())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TopicConfigPatch, D::Error> {
        let json = String::deserialize(d)?;
        TopicConfigPatch::from_json(&json).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        TopicConfig::default().validate().unwrap();
    }

    #[test]
    fn a_setting_outside_its_bounds_is_refused_by_name() {
        let c = TopicConfig { dedupe_window_ms: 50, ..TopicConfig::default() };
        assert!(matches!(c.validate(), Err(TopicConfigError::OutOfRange { field: "dedupe_window_ms", value: 50, .. })));
        let c = TopicConfig { dedupe_window_ms: DAY_MS + 1, ..TopicConfig::default() };
        assert!(matches!(c.validate(), Err(TopicConfigError::OutOfRange { field: "dedupe_window_ms", .. })));
    }

    #[test]
    fn a_dedupe_window_longer_than_retention_is_refused() {
        let c = TopicConfig { retention_ms: MINUTE_MS, dedupe_window_ms: 2 * MINUTE_MS, ..TopicConfig::default() };
        assert!(matches!(c.validate(), Err(TopicConfigError::Conflict(_))));
    }

    #[test]
    fn json_missing_a_setting_takes_its_default_and_unknown_settings_are_ignored() {
        let c = TopicConfig::from_json(r#"{"max_message_bytes": 4096, "from_a_newer_build": 1}"#).unwrap();
        assert_eq!(c, TopicConfig { max_message_bytes: 4096, ..TopicConfig::default() });
    }

    #[test]
    fn a_patch_sets_only_its_fields_and_refuses_unknown_ones() {
        let patch = TopicConfigPatch::from_json(r#"{"dedupe_window_ms": 300000}"#).unwrap();
        let c = TopicConfig::default().patched(&patch);
        assert_eq!(c.dedupe_window_ms, 300_000);
        assert_eq!(c.max_message_bytes, TopicConfig::default().max_message_bytes);
        let err = TopicConfigPatch::from_json(r#"{"dedupe_windw_ms": 1}"#).unwrap_err();
        assert!(err.to_string().contains("dedupe_windw_ms"), "{err}");
        assert!(TopicConfigPatch::default().is_empty());
        assert_eq!(TopicConfigPatch::from_json(&patch.to_json()).unwrap(), patch);
    }

    #[test]
    fn configs_survive_postcard_through_the_json_adapter() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Body {
            name: String,
            #[serde(with = "as_json")]
            config: TopicConfig,
        }
        let body = Body { name: "t".into(), config: TopicConfig { producer_expiry_ms: 2 * HOUR_MS, ..TopicConfig::default() } };
        let bytes = postcard::to_allocvec(&body).unwrap();
        assert_eq!(postcard::from_bytes::<Body>(&bytes).unwrap(), body);
    }

    #[test]
    fn the_retry_bound_grows_by_the_multiplier_up_to_the_cap() {
        let g = GroupConfig::default();
        g.validate().unwrap();
        assert_eq!((g.retry_bound_ms(1), g.retry_bound_ms(2), g.retry_bound_ms(3)), (1_000, 2_000, 4_000));
        assert_eq!(g.retry_bound_ms(60), 10 * MINUTE_MS);
        let c = GroupConfig { retry_base_ms: 5_000, retry_max_ms: 1_000, ..GroupConfig::default() };
        assert!(matches!(c.validate(), Err(TopicConfigError::Conflict(_))));
    }

    #[test]
    fn every_field_is_described() {
        let fields = TopicConfig::describe_fields();
        assert_eq!(fields.len(), TopicConfig::FIELD_NAMES.len());
        assert!(fields.iter().all(|(_, _, _, _, doc)| !doc.is_empty()));
    }
}
