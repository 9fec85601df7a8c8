//! Sabotage: deliberate bugs that the Jepsen harness' checker must catch, proving it can
//! fail on the real system. Compiled in only with the `sabotage` feature, and inert even
//! then unless the environment variable `KEEL_SABOTAGE` names a mode when the node
//! starts (tests build with every feature, so the variable is the switch that matters).
//!
//! | mode | the bug | what the checker sees |
//! |---|---|---|
//! | `ack-before-commit` | a produce is answered as soon as it is proposed, before a quorum has it | acknowledged messages lost when the leader dies |
//! | `ack-before-fsync` | the flusher acknowledges appends at once and writes them only every 500 ms | acknowledged messages lost when a majority crashes |
//! | `read-beyond-hw` | fetch serves the leader's whole log, committed or not, with no lease | reads of messages that are later truncated: one offset, two messages |
//! | `skip-dedupe` | neither the leader nor applying checks producer sequences | a retried batch stored twice |
//! | `forget-delivery-counts` | a queue fetch tells members the attempt number this leader counted itself since it became leader, not the replicated count | an attempt number delivered twice for one message after a leader change |
//! | `ack-without-recording` | a queue ack is answered `acked` without proposing it | the message is delivered again and a second ack is answered `acked` too |
//! | `ignore-schedule` | a queue lease does not defer scheduled messages whose time is ahead | a scheduled message delivered before its time |
//! | `ignore-ledger` | a group whose log lost acknowledged entries is treated as intact (the ack ledger is not consulted) | acknowledged messages lost after a minority's disk damage |

/// A deliberate bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    AckBeforeCommit,
    AckBeforeFsync,
    ReadBeyondHighWatermark,
    SkipDedupe,
    IgnoreLedger,
    ForgetDeliveryCounts,
    AckWithoutRecording,
    IgnoreSchedule,
}

impl Sabotage {
    pub fn parse(name: &str) -> Option<Sabotage> {
        match name {
            "ack-before-commit" => Some(Sabotage::AckBeforeCommit),
            "ack-before-fsync" => Some(Sabotage::AckBeforeFsync),
            "read-beyond-hw" => Some(Sabotage::ReadBeyondHighWatermark),
            "skip-dedupe" => Some(Sabotage::SkipDedupe),
            "ignore-ledger" => Some(Sabotage::IgnoreLedger),
            "forget-delivery-counts" => Some(Sabotage::ForgetDeliveryCounts),
            "ack-without-recording" => Some(Sabotage::AckWithoutRecording),
            "ignore-schedule" => Some(Sabotage::IgnoreSchedule),
            _ => None,
        }
    }
}

/// The mode this process runs with, if any (read once from `KEEL_SABOTAGE`).
pub fn mode() -> Option<Sabotage> {
    #[cfg(feature = "sabotage")]
    {
        static MODE: std::sync::OnceLock<Option<Sabotage>> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| {
            let mode = std::env::var("KEEL_SABOTAGE").ok().and_then(|m| Sabotage::parse(&m));
            if let Some(m) = mode {
                tracing::error!(?m, "SABOTAGE ACTIVE: this node breaks its guarantees on purpose (KEEL_SABOTAGE)");
                if m == Sabotage::AckBeforeFsync {
                    keel_storage::observe::set_ack_before_fsync(true);
                }
            }
            mode
        })
    }
    #[cfg(not(feature = "sabotage"))]
    {
        None
    }
}

/// Whether `s` is the active sabotage.
pub fn active(s: Sabotage) -> bool {
    mode() == Some(s)
}
