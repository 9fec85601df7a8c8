//! Checker self-tests: for every anomaly a synthetic history that must be flagged, and
//! clean histories (including `info` and `fail` edge cases) that must pass.

use super::*;
use crate::history::{DumpOp, FaultOp, LeaderOp, PollOp, Stamp};

const T: &str = "t";

/// Builds a synthetic history.
#[derive(Default)]
struct H {
    events: Vec<Event>,
    next_id: u64,
}

impl H {
    fn push(&mut self, id: u64, actor: Actor, kind: Kind, op: Op) {
        let index = self.events.len() as u64;
        self.events.push(Event { index, time: index * 1000, id, actor, kind, op, error: None });
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn send_op(partition: u32, msg: &str, idempotent: bool, stamp: Option<Stamp>) -> SendOp {
        SendOp { topic: T.into(), partition, msg: msg.into(), idempotent, stamp, offset: None, duplicate: false, priority: 0 }
    }

    /// A send by `process` that completes with `kind` (`None`: never completes).
    fn send_with(&mut self, process: u64, msg: &str, kind: Option<Kind>, offset: Option<u64>, idempotent: bool, stamp: Option<Stamp>) {
        let id = self.id();
        let op = H::send_op(0, msg, idempotent, stamp);
        self.push(id, Actor::Client(process), Kind::Invoke, Op::Send(op.clone()));
        if let Some(kind) = kind {
            self.push(id, Actor::Client(process), kind, Op::Send(SendOp { offset, ..op }));
        }
    }

    fn ack(&mut self, process: u64, msg: &str, offset: u64) {
        self.send_with(process, msg, Some(Kind::Ok), Some(offset), true, None);
    }

    fn poll(&mut self, process: u64, from: u64, records: &[(u64, &str)], hw: u64) {
        let id = self.id();
        let op = PollOp { topic: T.into(), partition: 0, from, records: Vec::new(), high_watermark: None, log_start: None };
        self.push(id, Actor::Client(process), Kind::Invoke, Op::Poll(op.clone()));
        let records = records.iter().map(|(o, m)| Read { offset: *o, msg: m.to_string() }).collect();
        self.push(id, Actor::Client(process), Kind::Ok, Op::Poll(PollOp { records, high_watermark: Some(hw), ..op }));
    }

    fn dump(&mut self, node: u64, records: &[(u64, &str)]) {
        let id = self.id();
        let records = records.iter().map(|(o, m)| Read { offset: *o, msg: m.to_string() }).collect();
        self.push(id, Actor::Runner, Kind::Info, Op::Dump(DumpOp { node, topic: T.into(), partition: 0, records }));
    }

    fn check(&self) -> Results {
        check(&self.events, Floors { acked_sends: 1, faults: 0, leader_changes: 0, dumped_nodes: 0, queue_acked: 0 })
    }
}

/// Three acknowledged sends, read back in order, dumped identically on two nodes.
fn clean() -> H {
    let mut h = H::default();
    for (i, m) in ["1-0", "1-1", "1-2"].iter().enumerate() {
        h.ack(1, m, i as u64);
    }
    h.poll(2, 0, &[(0, "1-0"), (1, "1-1")], 2);
    h.poll(2, 2, &[(2, "1-2")], 3);
    h.dump(1, &[(0, "1-0"), (1, "1-1"), (2, "1-2")]);
    h.dump(2, &[(0, "1-0"), (1, "1-1")]);
    h
}

fn assert_flags(h: &H, name: &str) -> Results {
    let r = h.check();
    let a = r.anomaly(name).unwrap_or_else(|| panic!("no row {name}"));
    assert!(a.count > 0, "{name} not flagged: {r:#?}");
    if a.verdict == Verdict::Forbidden {
        assert!(!r.valid, "a forbidden {name} makes the run invalid");
    }
    r
}

#[test]
fn a_clean_history_passes_with_every_row_at_zero() {
    let r = clean().check();
    assert!(r.valid, "{r:#?}");
    assert!(r.anomalies.iter().all(|a| a.count == 0), "{r:#?}");
    assert_eq!((r.stats.acked, r.stats.distinct_read, r.stats.dumps), (3, 3, 2));
}

#[test]
fn two_messages_at_one_offset_are_inconsistent_offsets() {
    let mut h = clean();
    h.poll(3, 1, &[(1, "1-2")], 3);
    assert_flags(&h, "inconsistent-offsets");
}

#[test]
fn an_acknowledged_message_below_the_offsets_read_and_never_read_is_a_lost_write() {
    let mut h = H::default();
    h.ack(1, "1-0", 0);
    h.ack(1, "1-1", 1);
    h.ack(1, "1-2", 2);
    h.poll(2, 0, &[(0, "1-0"), (2, "1-2")], 3);
    let r = assert_flags(&h, "lost-write");
    assert_eq!(r.anomaly("lost-write").unwrap().count, 1);
    assert_eq!(r.anomaly("lost-unseen-middle").unwrap().count, 1, "and it is lost from the middle of its writer's order");
}

#[test]
fn unseen_acknowledged_messages_are_split_by_their_writers_order() {
    let mut h = H::default();
    for (i, m) in ["1-0", "1-1", "1-2", "1-3", "1-4"].iter().enumerate() {
        h.ack(1, m, i as u64);
    }
    h.poll(2, 1, &[(1, "1-1")], 5);
    h.poll(3, 3, &[(3, "1-3")], 5);
    let r = h.check();
    let count = |n| r.anomaly(n).unwrap().count;
    assert_eq!((count("lost-unseen-prefix"), count("lost-unseen-middle"), count("lost-unseen-postfix")), (1, 1, 1), "{r:#?}");
    assert!(!r.valid);
}

#[test]
fn a_node_whose_log_skips_an_acknowledged_message_loses_it_on_node() {
    let mut h = clean();
    h.dump(3, &[(0, "1-0"), (2, "1-2")]);
    assert_flags(&h, "lost-on-node");
}

#[test]
fn two_nodes_disagreeing_on_an_offset_are_split_brain() {
    let mut h = clean();
    h.send_with(4, "4-0", Some(Kind::Info), None, true, None);
    h.dump(3, &[(0, "1-0"), (1, "4-0")]);
    assert_flags(&h, "split-brain");
}

#[test]
fn a_message_read_but_never_sent_is_unexpected() {
    let mut h = clean();
    h.poll(3, 3, &[(3, "ghost")], 4);
    assert_flags(&h, "unexpected");
}

#[test]
fn reading_a_send_that_failed_definitely_is_an_aborted_read() {
    let mut h = clean();
    h.send_with(1, "1-3", Some(Kind::Fail), None, true, None);
    h.poll(3, 3, &[(3, "1-3")], 4);
    assert_flags(&h, "aborted-read");
}

#[test]
fn reading_a_send_of_unknown_outcome_is_allowed_and_counted() {
    let mut h = clean();
    h.send_with(1, "1-3", Some(Kind::Info), None, true, None);
    h.send_with(1, "1-4", None, None, true, None); // never completed: unknown too
    h.send_with(1, "1-5", Some(Kind::Info), None, true, None); // unknown, never read: not lost
    h.poll(3, 3, &[(3, "1-3"), (4, "1-4")], 5);
    let r = h.check();
    assert!(r.valid, "{r:#?}");
    assert_eq!(r.anomaly("recovered").unwrap().count, 2);
    assert_eq!(r.stats.unknown, 3);
}

#[test]
fn an_idempotent_message_at_two_offsets_is_a_forbidden_duplicate_and_a_plain_one_is_counted() {
    let mut h = clean();
    h.poll(3, 0, &[(0, "1-0"), (1, "1-1"), (2, "1-2"), (3, "1-1")], 4);
    assert_flags(&h, "duplicate-append");
    let mut h = clean();
    h.send_with(5, "5-0", Some(Kind::Ok), Some(3), false, None);
    h.poll(3, 3, &[(3, "5-0"), (4, "5-0")], 5);
    let r = h.check();
    assert_eq!(r.anomaly("duplicate-append-non-idempotent").unwrap().count, 1);
    assert!(r.valid, "allowed without idempotence: {r:#?}");
}

fn stamp(sequence: i32) -> Option<Stamp> {
    Some(Stamp { producer_id: 7, epoch: 0, sequence })
}

#[test]
fn one_sequence_at_two_offsets_or_out_of_order_or_with_a_gap_is_a_seq_offset_anomaly() {
    // Two acknowledgements of sequence 1 (a retry) at different offsets.
    let mut h = H::default();
    h.send_with(1, "1-0", Some(Kind::Ok), Some(0), true, stamp(0));
    h.send_with(1, "1-1", Some(Kind::Ok), Some(1), true, stamp(1));
    h.send_with(1, "1-1r", Some(Kind::Ok), Some(2), true, stamp(1));
    assert_flags(&h, "seq-offset");
    // Sequence order against offset order.
    let mut h = H::default();
    h.send_with(1, "1-0", Some(Kind::Ok), Some(1), true, stamp(0));
    h.send_with(1, "1-1", Some(Kind::Ok), Some(0), true, stamp(1));
    assert_flags(&h, "seq-offset");
    // A gap accepted: 2 stored after 0 while 1 never was.
    let mut h = H::default();
    h.send_with(1, "1-0", Some(Kind::Ok), Some(0), true, stamp(0));
    h.send_with(1, "1-1", Some(Kind::Info), None, true, stamp(1));
    h.send_with(1, "1-2", Some(Kind::Ok), Some(1), true, stamp(2));
    h.poll(2, 0, &[(0, "1-0"), (1, "1-2")], 2);
    assert_flags(&h, "seq-offset");
    // The same with sequence 1 stored (its send timed out, but it is in the log): fine.
    let mut h = H::default();
    h.send_with(1, "1-0", Some(Kind::Ok), Some(0), true, stamp(0));
    h.send_with(1, "1-1", Some(Kind::Info), None, true, stamp(1));
    h.send_with(1, "1-2", Some(Kind::Ok), Some(2), true, stamp(2));
    h.poll(2, 0, &[(0, "1-0"), (1, "1-1"), (2, "1-2")], 3);
    let r = h.check();
    assert!(r.valid, "{r:#?}");
}

#[test]
fn a_producers_later_send_at_a_lower_offset_is_nonmonotonic() {
    let mut h = H::default();
    h.ack(1, "1-0", 5);
    h.ack(1, "1-1", 3);
    assert_flags(&h, "nonmonotonic-send");
}

#[test]
fn order_is_promised_per_priority_lane_not_across_lanes() {
    let send = |h: &mut H, msg: &str, offset: u64, priority: u8| {
        let id = h.id();
        let op = SendOp { priority, ..H::send_op(0, msg, true, None) };
        h.push(id, Actor::Client(1), Kind::Invoke, Op::Send(op.clone()));
        h.push(id, Actor::Client(1), Kind::Ok, Op::Send(SendOp { offset: Some(offset), ..op }));
    };
    // A lane-3 record sent after a lane-0 one may be stored first.
    let mut h = H::default();
    send(&mut h, "1-0", 5, 0);
    send(&mut h, "1-1", 3, 3);
    h.poll(2, 0, &[(3, "1-1"), (5, "1-0")], 6);
    let r = h.check();
    assert!(!r.anomalies.iter().any(|a| a.name == "nonmonotonic-send" && a.count > 0), "{r:#?}");
    // Within one lane it may not.
    let mut h = H::default();
    send(&mut h, "1-0", 5, 3);
    send(&mut h, "1-1", 3, 3);
    assert_flags(&h, "nonmonotonic-send");
}

#[test]
fn a_reader_going_back_is_nonmonotonic_and_one_jumping_over_a_message_skips() {
    let mut h = clean();
    h.poll(3, 1, &[(1, "1-1")], 3);
    h.poll(3, 0, &[(0, "1-0")], 3);
    assert_flags(&h, "nonmonotonic-poll");
    let mut h = clean();
    h.poll(3, 0, &[(0, "1-0"), (2, "1-2")], 3);
    assert_flags(&h, "poll-skip");
    // A gap where the log holds no message (a batch that was never served) is no skip.
    let mut h = H::default();
    h.ack(1, "1-0", 0);
    h.ack(1, "1-1", 5);
    h.poll(2, 0, &[(0, "1-0"), (5, "1-1")], 6);
    assert!(h.check().valid);
}

#[test]
fn a_high_watermark_going_back_for_one_reader_is_a_committed_regression() {
    let mut h = clean();
    h.poll(3, 0, &[(0, "1-0")], 3);
    h.poll(3, 1, &[(1, "1-1")], 2);
    assert_flags(&h, "committed-regression");
}

#[test]
fn a_run_that_exercised_too_little_is_invalid_without_any_anomaly() {
    let h = clean();
    let r = check(&h.events, Floors::default());
    assert!(!r.valid);
    assert!(r.anomalies.iter().all(|a| a.count == 0));
    // Acks, faults, leader changes, and the clean history dumps only two nodes' logs.
    assert_eq!(r.vacuous.len(), 4, "{:?}", r.vacuous);
    assert!(r.vacuous[3].contains("2 nodes' committed logs dumped"), "{:?}", r.vacuous);
    // With a fault and a leader change recorded and enough sends, the floors are met.
    let mut h = clean();
    h.push(100, Actor::Nemesis, Kind::Info, Op::Fault(FaultOp { name: "kill".into(), phase: "start".into(), detail: serde_json::Value::Null }));
    for (leader, term) in [(1, 1), (2, 2)] {
        h.push(101, Actor::Runner, Kind::Info, Op::Leader(LeaderOp { topic: T.into(), partition: 0, leader: Some(leader), term }));
    }
    let r = check(&h.events, Floors { acked_sends: 3, faults: 1, leader_changes: 1, dumped_nodes: 0, queue_acked: 0 });
    assert!(r.valid, "{r:#?}");
}

#[test]
fn a_node_finding_damage_without_a_damaged_disk_is_a_false_alarm_and_with_one_is_counted() {
    let mut h = clean();
    let id = h.id();
    h.push(id, Actor::Runner, Kind::Info, Op::Damage(crate::history::DamageOp { node: 2, detections: 1 }));
    let r = assert_flags(&h, "false-damage");
    assert_eq!(r.anomaly("damage-detected").unwrap().count, 0);
    let mut h = clean();
    h.push(100, Actor::Nemesis, Kind::Info, Op::Fault(FaultOp { name: "corrupt".into(), phase: "start".into(), detail: serde_json::Value::Null }));
    h.push(101, Actor::Runner, Kind::Info, Op::Damage(crate::history::DamageOp { node: 3, detections: 2 }));
    let r = h.check();
    assert!(r.valid, "{r:#?}");
    assert_eq!((r.anomaly("damage-detected").unwrap().count, r.anomaly("false-damage").unwrap().count), (2, 0));
}

#[test]
fn the_longest_gap_between_acknowledgements_and_the_deduplicated_retries_are_counted() {
    let mut h = clean();
    // Acks at events 1, 3, 5 (1 µs apart each); pad 3,000 events, then one more ack.
    for _ in 0..3_000 {
        let id = h.id();
        h.push(id, Actor::Runner, Kind::Info, Op::Leader(LeaderOp { topic: T.into(), partition: 0, leader: Some(1), term: 1 }));
    }
    let id = h.id();
    let op = SendOp { topic: T.into(), partition: 0, msg: "1-0".into(), idempotent: true, stamp: None, offset: Some(0), duplicate: true, priority: 0 };
    h.push(id, Actor::Client(1), Kind::Invoke, Op::Send(SendOp { offset: None, duplicate: false, ..op.clone() }));
    let before = h.events.len() as u64 - 1;
    h.push(id, Actor::Client(1), Kind::Ok, Op::Send(op));
    let r = h.check();
    assert!(r.valid, "a retry answered with the original offset is not a duplicate: {r:#?}");
    assert_eq!(r.stats.retries_deduplicated, 1);
    assert_eq!(r.stats.duplicates_stored, 0);
    // The last ack came (before + 1) * 1000 ns after event 0; the one before at event 5.
    assert_eq!(r.stats.longest_ack_gap_ms, ((before + 1) * 1000 - 5 * 1000) / 1_000_000);
    assert!(r.stats.longest_ack_gap_ms >= 2, "{}", r.stats.longest_ack_gap_ms);
}

// ----- the queue rows -----

mod queue_rows {
    use super::*;
    use crate::history::{DeadLetterOp, DeliverOp, SettleOp};
    use crate::workload::QUEUE_TOPIC;

    impl H {
        fn queue_send(&mut self, msg: &str, offset: u64) {
            let id = self.id();
            let op =
                SendOp { topic: QUEUE_TOPIC.into(), partition: 0, msg: msg.into(), idempotent: true, stamp: None, offset: None, duplicate: false, priority: 0 };
            self.push(id, Actor::Client(1), Kind::Invoke, Op::Send(op.clone()));
            self.push(id, Actor::Client(1), Kind::Ok, Op::Send(SendOp { offset: Some(offset), ..op }));
        }

        fn deliver(&mut self, offset: u64, attempt: u32) {
            let id = self.id();
            let op = DeliverOp {
                topic: QUEUE_TOPIC.into(),
                partition: 0,
                offset,
                msg: format!("m{offset}"),
                attempt,
                member: "w".into(),
                deliver_at_ms: None,
                received_ms: 0,
            };
            self.push(id, Actor::Client(2), Kind::Info, Op::Deliver(op));
        }

        fn settle(&mut self, offset: u64, attempt: u32, verb: &str, outcome: &str) {
            let id = self.id();
            let op = SettleOp { topic: QUEUE_TOPIC.into(), partition: 0, offset, attempt, verb: verb.into(), outcome: None };
            self.push(id, Actor::Client(2), Kind::Invoke, Op::Settle(op.clone()));
            self.push(id, Actor::Client(2), Kind::Ok, Op::Settle(SettleOp { outcome: Some(outcome.into()), ..op }));
        }

        fn dead_letter(&mut self, offset: u64) {
            let id = self.id();
            let op = DeadLetterOp {
                topic: QUEUE_TOPIC.into(),
                source_partition: 0,
                source_offset: offset,
                msg: format!("m{offset}"),
                attempts: QUEUE_MAX_DELIVERIES,
                cause: "max_deliveries".into(),
                dlq_offset: 0,
            };
            self.push(id, Actor::Runner, Kind::Info, Op::DeadLetter(op));
        }

        fn drained(&mut self) {
            let id = self.id();
            self.push(id, Actor::Runner, Kind::Info, Op::QueueDrained);
        }
    }

    /// Two messages: one acked after a retry, one dead-lettered after max deliveries.
    fn clean_queue() -> H {
        let mut h = H::default();
        h.queue_send("m0", 0);
        h.queue_send("m1", 1);
        h.deliver(0, 1);
        h.settle(0, 1, "nack", "retrying");
        h.deliver(0, 2);
        h.settle(0, 2, "ack", "acked");
        h.settle(0, 2, "ack", "already-settled");
        for a in 1..=QUEUE_MAX_DELIVERIES {
            h.deliver(1, a);
            h.settle(1, a, "nack", if a < QUEUE_MAX_DELIVERIES { "retrying" } else { "dead-lettering" });
        }
        h.dead_letter(1);
        h.drained();
        // The log rows see the queue topic through the nodes' dumps.
        let id = h.id();
        let records = vec![Read { offset: 0, msg: "m0".into() }, Read { offset: 1, msg: "m1".into() }];
        h.push(id, Actor::Runner, Kind::Info, Op::Dump(DumpOp { node: 1, topic: QUEUE_TOPIC.into(), partition: 0, records }));
        h
    }

    #[test]
    fn a_clean_queue_history_is_valid() {
        let r = clean_queue().check();
        assert!(r.valid, "{r:#?}");
        assert_eq!((r.stats.queue_acked, r.stats.queue_dead_lettered), (1, 1));
        assert!(r.anomaly("queue-redelivered").unwrap().count > 0);
    }

    #[test]
    fn a_message_neither_acked_nor_dead_lettered_is_lost() {
        let mut h = clean_queue();
        h.queue_send("m2", 2);
        h.deliver(2, 1);
        assert_flags(&h, "queue-lost");
    }

    #[test]
    fn a_message_whose_ack_outcome_is_unknown_is_not_lost() {
        let mut h = clean_queue();
        h.queue_send("m2", 2);
        h.deliver(2, 1);
        let id = h.id();
        let op = SettleOp { topic: QUEUE_TOPIC.into(), partition: 0, offset: 2, attempt: 1, verb: "ack".into(), outcome: None };
        h.push(id, Actor::Client(2), Kind::Invoke, Op::Settle(op.clone()));
        h.push(id, Actor::Client(2), Kind::Info, Op::Settle(op));
        assert_eq!(h.check().anomaly("queue-lost").unwrap().count, 0);
    }

    #[test]
    fn without_the_final_drain_the_run_is_vacuous_not_lossy() {
        let mut h = H::default();
        h.queue_send("m0", 0);
        h.deliver(0, 1);
        let r = h.check();
        assert_eq!(r.anomaly("queue-lost").unwrap().count, 0);
        assert!(!r.valid && r.vacuous.iter().any(|v| v.contains("drain")), "{r:#?}");
    }

    #[test]
    fn two_acks_answered_acked_are_a_double_ack() {
        let mut h = clean_queue();
        h.deliver(0, 3);
        h.settle(0, 3, "ack", "acked");
        assert_flags(&h, "queue-double-ack");
    }

    #[test]
    fn an_acked_message_in_the_dead_letter_topic_is_flagged() {
        let mut h = clean_queue();
        h.dead_letter(0);
        assert_flags(&h, "queue-acked-and-dead-lettered");
    }

    #[test]
    fn a_scheduled_message_received_before_its_time_was_delivered_early() {
        let scheduled = |h: &mut H, received_ms: i64| {
            let id = h.id();
            let op = DeliverOp {
                topic: QUEUE_TOPIC.into(),
                partition: 0,
                offset: 0,
                msg: "m0".into(),
                attempt: 1,
                member: "w".into(),
                deliver_at_ms: Some(10_000),
                received_ms,
            };
            h.push(id, Actor::Client(2), Kind::Info, Op::Deliver(op));
        };
        let mut h = clean_queue();
        scheduled(&mut h, 10_000);
        assert_eq!(h.check().anomaly("queue-delivered-early").unwrap().count, 0, "at its time is fine");
        let mut h = clean_queue();
        scheduled(&mut h, 9_999);
        assert_flags(&h, "queue-delivered-early");
    }

    #[test]
    fn a_message_dead_lettered_twice_is_flagged() {
        let mut h = clean_queue();
        h.dead_letter(1);
        assert_flags(&h, "queue-dead-lettered-twice");
    }

    #[test]
    fn an_attempt_number_delivered_twice_is_a_forgotten_count() {
        let mut h = clean_queue();
        h.deliver(0, 1);
        assert_flags(&h, "queue-attempt-repeated");
    }

    #[test]
    fn an_attempt_beyond_max_deliveries_is_flagged() {
        let mut h = clean_queue();
        h.deliver(1, QUEUE_MAX_DELIVERIES + 1);
        assert_flags(&h, "queue-attempts-over-max");
    }

    #[test]
    fn dead_letter_topic_dumps_are_not_duplicates_of_their_sources() {
        let mut h = clean_queue();
        let id = h.id();
        h.push(
            id,
            Actor::Runner,
            Kind::Info,
            Op::Dump(DumpOp { node: 1, topic: format!("{QUEUE_TOPIC}.dlq"), partition: 0, records: vec![Read { offset: 0, msg: "m1".into() }] }),
        );
        let id = h.id();
        h.push(
            id,
            Actor::Runner,
            Kind::Info,
            Op::Dump(DumpOp { node: 1, topic: QUEUE_TOPIC.into(), partition: 0, records: vec![Read { offset: 1, msg: "m1".into() }] }),
        );
        let r = h.check();
        assert_eq!(r.anomaly("duplicate-append").unwrap().count, 0, "{r:#?}");
    }
}

mod replay {
    use super::*;
    use crate::history::ReplayOp;

    /// The W1 topic as two nodes dumped it, and a replay of offsets 1..4 into `target`
    /// (holding `copied`) that ended `state`.
    fn replayed(copied: &[&str], state: &str) -> H {
        let mut h = clean();
        let source = [(0, "1-0"), (1, "1-1"), (2, "1-2"), (3, "1-3"), (4, "1-4")];
        for node in [1, 2] {
            let records = source.iter().map(|(o, m)| Read { offset: *o, msg: m.to_string() }).collect();
            let id = h.id();
            h.push(id, Actor::Runner, Kind::Info, Op::Dump(DumpOp { node, topic: LOG_TOPIC.into(), partition: 0, records }));
        }
        let target = "jepsen-log.replay-0".to_string();
        let records = copied.iter().enumerate().map(|(o, m)| Read { offset: o as u64, msg: m.to_string() }).collect();
        let id = h.id();
        h.push(id, Actor::Runner, Kind::Info, Op::Dump(DumpOp { node: 1, topic: target.clone(), partition: 0, records }));
        let id = h.id();
        h.push(id, Actor::Runner, Kind::Invoke, Op::Replay(ReplayOp { target: target.clone(), job: None, state: None, ranges: vec![] }));
        let done = ReplayOp { target, job: Some(1), state: Some(state.into()), ranges: vec![(0, 1, 4)] };
        h.push(id, Actor::Runner, Kind::Ok, Op::Replay(done));
        h
    }

    #[test]
    fn a_replay_holding_its_range_once_in_order_passes() {
        let r = replayed(&["1-1", "1-2", "1-3"], "done").check();
        assert!(ROWS_REPLAY.iter().all(|n| r.anomaly(n).unwrap().count == 0), "{r:#?}");
        assert_eq!((r.stats.replays_done, r.stats.replayed), (1, 3));
    }

    const ROWS_REPLAY: [&str; 5] = ["replay-lost", "replay-duplicated", "replay-reordered", "replay-extra", "replay-unfinished"];

    #[test]
    fn a_replay_that_lost_duplicated_reordered_or_added_a_message_or_did_not_finish_is_flagged() {
        assert_flags(&replayed(&["1-1", "1-3"], "done"), "replay-lost");
        assert_flags(&replayed(&["1-1", "1-2", "1-2", "1-3"], "done"), "replay-duplicated");
        assert_flags(&replayed(&["1-2", "1-1", "1-3"], "done"), "replay-reordered");
        assert_flags(&replayed(&["1-0", "1-1", "1-2", "1-3"], "done"), "replay-extra");
        assert_flags(&replayed(&["1-1"], "failed: no progress"), "replay-unfinished");
    }
}

impl H {
    /// A poll that found the log start past `from` (retention): no records.
    fn poll_behind_start(&mut self, process: u64, from: u64, start: u64, hw: u64) {
        let id = self.id();
        let op = PollOp { topic: T.into(), partition: 0, from, records: Vec::new(), high_watermark: None, log_start: None };
        self.push(id, Actor::Client(process), Kind::Invoke, Op::Poll(op.clone()));
        self.push(id, Actor::Client(process), Kind::Ok, Op::Poll(PollOp { high_watermark: Some(hw), log_start: Some(start), ..op }));
    }
}

/// Six acknowledged messages; retention deleted the first three before the reader,
/// which had read offset 0, came back.
fn retained(read_back: &[(u64, &'static str)]) -> H {
    let mut h = H::default();
    for i in 0..6u64 {
        h.ack(1, &format!("1-{i}"), i);
    }
    h.poll(2, 0, &[(0, "1-0")], 6);
    h.poll_behind_start(2, 1, 3, 6);
    h.poll(2, 3, read_back, 6);
    h.dump(1, read_back);
    h
}

#[test]
fn messages_retention_deleted_before_a_reader_saw_them_are_counted_not_lost() {
    let r = retained(&[(3, "1-3"), (4, "1-4"), (5, "1-5")]).check();
    assert!(r.valid, "{r:#?}");
    assert_eq!(r.anomaly("retained-away").unwrap().count, 2, "offsets 1 and 2");
    assert_eq!(r.anomaly("poll-skip").unwrap().count, 0, "moving to the log start is not a skip");
}

#[test]
fn a_message_missing_above_the_log_start_is_still_lost() {
    let h = retained(&[(3, "1-3"), (5, "1-5")]);
    assert_flags(&h, "poll-skip");
    assert_flags(&h, "lost-unseen-middle");
}
