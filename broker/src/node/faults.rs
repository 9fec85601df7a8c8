//! Test-only faults a node can be told to inject (the admin listener's
//! `POST /test/faults`, compiled only with the `fault-injection` feature): the switches
//! exist in every build, so the code paths that consult them are always compiled, but
//! nothing can turn them on without the feature.

use std::sync::atomic::{AtomicU32, Ordering};

/// The faults a node injects. All off by default.
#[derive(Debug, Default)]
pub struct NodeFaults {
    /// The next this-many successful produce answers are not sent: the connection is
    /// closed instead, after the batch was appended and committed (an answer lost on
    /// the way back).
    drop_produce_answers: AtomicU32,
}

impl NodeFaults {
    /// Whether to drop this produce answer (counting it if so).
    pub fn take_produce_answer_drop(&self) -> bool {
        self.drop_produce_answers.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
    }

    #[cfg(feature = "fault-injection")]
    pub fn drop_produce_answers(&self, count: u32) {
        self.drop_produce_answers.store(count, Ordering::Release);
    }
}
