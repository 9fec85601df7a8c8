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
    /// (e.g. `DuplicateMessageIds`). `after_unknown`: an earlier attempt of the same
    /// request ended with an unknown outcome (so it may have taken effect anyway).
    #[error("{what}: {code}: {message}")]
    Refused { what: String, code: ErrorCode, message: String, body: bytes::Bytes, after_unknown: bool },
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

/// Whether a failed operation took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It definitely did not (refused before anything was applied, or never sent).
    Definite,
    /// It may or may not have: a timeout, a lost connection, an unclassifiable error.
    Indefinite,
}

impl ClientError {
    /// Whether the failed operation may still have taken effect. Only what the broker
    /// (or the client itself, before sending) refused is definite.
    pub fn outcome(&self) -> Outcome {
        match self {
            ClientError::Refused { code, after_unknown: false, .. } if code.is_definite() => Outcome::Definite,
            ClientError::Broker { code, .. } if code.is_definite() => Outcome::Definite,
            ClientError::Invalid(_) | ClientError::UnknownTopic(_) => Outcome::Definite,
            _ => Outcome::Indefinite,
        }
    }

    /// The broker's error code, if a broker refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } | ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The range the partition holds, if this is an `OffsetOutOfRange` refusal (behind
    /// the log start: retention deleted the offset asked for; or past the end).
    pub fn out_of_range(&self) -> Option<keel_protocol::message::OutOfRange> {
        match self {
            ClientError::Refused { code: ErrorCode::OffsetOutOfRange, body, .. } => keel_protocol::message::decode(body).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: ErrorCode) -> ClientError {
        ClientError::Refused { what: "t/0".into(), code, message: String::new(), body: bytes::Bytes::new(), after_unknown: false }
    }

    #[test]
    fn only_what_was_refused_before_taking_effect_is_definite() {
        for code in
            [ErrorCode::InvalidBatch, ErrorCode::OutOfOrderSequence, ErrorCode::ProducerFenced, ErrorCode::DuplicateMessageIds, ErrorCode::MessageTooLarge]
        {
            assert_eq!(refused(code).outcome(), Outcome::Definite, "{code:?}");
        }
        let broker = |code| ClientError::Broker { what: "t/0".into(), code, message: String::new() };
        assert_eq!(broker(ErrorCode::NotLeader).outcome(), Outcome::Definite, "a NotLeader answer comes before any append");
        assert_eq!(broker(ErrorCode::Throttled).outcome(), Outcome::Definite);
        for code in [ErrorCode::RequestTimedOut, ErrorCode::StorageFailed, ErrorCode::Unknown] {
            assert_eq!(refused(code).outcome(), Outcome::Indefinite, "{code:?}");
        }
        let timeout = ClientError::Timeout { what: "t/0".into(), timeout: Duration::from_secs(1), last: "connection lost".into() };
        assert_eq!(timeout.outcome(), Outcome::Indefinite);
        assert_eq!(ClientError::NoBroker { tried: "a".into(), last: "b".into() }.outcome(), Outcome::Indefinite);
        assert_eq!(ClientError::RetryBudgetExhausted { what: "t".into(), last: "x".into() }.outcome(), Outcome::Indefinite);
        assert_eq!(ClientError::Invalid("bad".into()).outcome(), Outcome::Definite, "never sent");
        let late = ClientError::Refused {
            what: "t/0".into(),
            code: ErrorCode::ProducerFenced,
            message: String::new(),
            body: bytes::Bytes::new(),
            after_unknown: true,
        };
        assert_eq!(late.outcome(), Outcome::Indefinite, "a refusal after an attempt of unknown outcome cannot undo that attempt");
    }
}
