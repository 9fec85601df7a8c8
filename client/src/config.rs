//! Client settings and their defaults, in one place.

use std::time::Duration;

/// Settings shared by `Admin`, `Producer` and `Consumer`.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Broker client addresses to start from (`host:port`).
    pub bootstrap: Vec<String>,
    /// Deadline of one operation, retries included (a produce, a fetch, an admin call).
    pub request_timeout: Duration,
    /// Timeout of a single attempt on the wire.
    pub attempt_timeout: Duration,
    /// Retry backoff: first delay ceiling and cap (full jitter below the ceiling).
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Retries allowed per request (fraction) and saved up at most. Only retries after a
    /// failure the cluster paid for (a timeout, a lost connection, a retriable error)
    /// spend budget; following a redirect, waiting out an election or a throttle, or a
    /// broker whose circuit is open do not.
    pub retry_budget_ratio: f64,
    pub retry_budget_max: f64,
    /// Consecutive failures that open a broker's circuit, and how long it stays open.
    pub breaker_threshold: u32,
    pub breaker_cool_down: Duration,
    /// Metadata older than this is refreshed before use.
    pub metadata_max_age: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            bootstrap: vec!["127.0.0.1:9092".into(), "127.0.0.1:9093".into(), "127.0.0.1:9094".into()],
            request_timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(250),
            retry_budget_ratio: 0.2,
            retry_budget_max: 256.0,
            breaker_threshold: 5,
            breaker_cool_down: Duration::from_secs(1),
            metadata_max_age: Duration::from_secs(30),
        }
    }
}

impl ClientConfig {
    /// Defaults with the given bootstrap list (`host:port[,host:port…]`).
    pub fn with_bootstrap(list: &str) -> ClientConfig {
        ClientConfig { bootstrap: list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(), ..ClientConfig::default() }
    }
}
