//! Client errors: each says what failed, why, and what to do.

use std::time::Duration;

use keel_protocol::ErrorCode;

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No broker answered.
    #[error("no broker reachable (tried {tried}): {last}; check --bootstrap / KEEL_BOOTSTRAP and that the cluster is running")]
    NoBroker { tried: String, last: String },
    /// A broker refused the request (a retriable refusal that outlasted the retries).
    #[error("{what}: {code}: {message}")]
    Broker { what: String, code: ErrorCode, message: String },
    /// A broker refused the request for good; `body` holds the refusal's details
    /// (e.g. `DuplicateMessageIds`).
    #[error("{what}: {code}: {message}")]
    Refused { what: String, code: ErrorCode, message: String, body: bytes::Bytes },
    /// The operation did not finish in time. For a produce, the outcome is unknown.
    #[error("{what} did not complete within {timeout:?} (last error: {last}); the outcome is unknown, retry or raise the timeout")]
    Timeout { what: String, timeout: Duration, last: String },
    /// The retry budget is spent: too many requests are failing right now.
    #[error("{what} failed and the retry budget is spent (many requests are failing); last error: {last}")]
    RetryBudgetExhausted { what: String, last: String },
    /// The topic does not exist.
    #[error("topic {0:?} does not exist; create it with `keel topic create {0}`")]
    UnknownTopic(String),
    /// An argument is invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A response did not decode (a version mismatch or a bug).
    #[error("the response from {addr} did not decode: {reason}; check that client and broker versions match")]
    Malformed { addr: String, reason: String },
    /// A stored batch does not decode: no consumer can read it. It was stored before
    /// brokers validated every record, or damaged in a way its checksum missed.
    #[error("{topic}/{partition}: the stored batch at offsets {offset}..{next_offset} does not decode ({reason}); skip it explicitly to go on (`Consumer::skip_to({partition}, {next_offset})`, or `keel consume --skip-undecodable`)")]
    UndecodableBatch { topic: String, partition: u32, offset: u64, next_offset: u64, reason: String },
    /// The producer or consumer was closed.
    #[error("the {0} is closed")]
    Closed(&'static str),
}

impl ClientError {
    /// The broker's error code, if a broker refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } | ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}
