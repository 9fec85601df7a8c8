//! The partition leader's side of consumer groups: stream groups' offset commits, and
//! queue groups' leased fetches and settle verbs.
//!
//! Everything a group's state changes by is a control entry, proposed here with this
//! leader's clock and answered only once applied (so committed on a majority): a member
//! is sent a message only after its lease — and the attempt number it carries — is
//! committed, and an ack is answered only once it is durable. The fold
//! (`crate::partition::consumers`) judges every entry again, so a lease that raced
//! another, or a nack from a member whose lease already expired, changes nothing.
//!
//! Leasing for one group in one partition is serialised (a lock per group held from the
//! plan to the applied lease), so two members' fetches never propose the same offsets.
//! Settling is not: the fold orders settles among themselves and with leases.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_protocol::message::{
    CommittedOffset, GroupStateResponse, Lease, QueueGroupState, QueueStart, SettleItem, SettleOutcome, SettleVerb, Stall, StreamGroupState,
};
use keel_protocol::GroupConfig;
use rand::RngExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{now_ms, Partition, PartitionError};
use crate::node::limits::{QUEUE_READ_CHUNK_BYTES, QUEUE_REDELIVER_SCAN_MAX, STALL_LOG_EVERY_MS};
use crate::partition::consumers::{CommitResult, Settle, SettleResult, Slot, SlotState};
use crate::partition::lanes::LANES;
use crate::partition::{ControlCommand, ControlEntry, ControlOutcome};
use crate::replication::log_store::KIND_BATCH;
use crate::replication::{ApplyReply, EntryData};

/// A queue fetch as the leader serves it.
#[derive(Debug, Clone)]
pub struct QueueFetch {
    pub group: String,
    pub member: String,
    pub max_messages: u32,
    pub max_bytes: u64,
    pub max_wait: Duration,
    pub start: QueueStart,
    /// Delivery weight per priority lane (from the topic's settings).
    pub lane_weights: [u64; LANES],
}

/// The key hash ordered groups order by (the same on every node: fixed keys).
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x6b65_656c_6b65_7931, 0x6b65_656c_6b65_7932);
    std::hash::Hasher::write(&mut h, key);
    std::hash::Hasher::finish(&h)
}

/// Messages leased to a member: the leases and the batches holding them.
#[derive(Debug, Clone)]
pub struct Leased {
    pub leases: Vec<Lease>,
    pub lease_deadline_ms: i64,
    pub high_watermark: u64,
    pub stall: Option<Stall>,
    pub batches: Vec<Bytes>,
}

/// What one lease round plans to propose.
struct Plan {
    /// Where a new group starts (every lane).
    start: u64,
    /// Per lane with new messages to lease: `(lane, its cursor, until)`.
    new: Vec<(u8, u64, u64)>,
    /// New messages planned in total (the ranges may span other lanes' offsets).
    new_count: u32,
    redeliver: Vec<u64>,
    /// Leases that ran out on the last allowed attempt: `(offset, attempt)`, to expire
    /// into the dead-letter topic instead of redelivering.
    exhausted: Vec<(u64, u32)>,
    stall: Option<Stall>,
    high_watermark: u64,
    /// When something becomes due (a retry time or a lease deadline), if anything will.
    next_due_ms: Option<i64>,
    /// The group has never leased here: propose an empty lease first, so the group
    /// exists from where it starts (a `Latest` start must not move with later writes).
    create: bool,
}

impl Partition {
    /// The lock serialising lease proposals of `group` in this partition, over the
    /// leases proposed and not yet applied.
    fn lease_lock(&self, group: &str) -> Arc<tokio::sync::Mutex<LeaseOverlay>> {
        let mut locks = self.lease_locks.lock().expect("lease locks poisoned");
        locks.entry(group.to_string()).or_default().clone()
    }

    /// Proposes the control command `make(leader_time_ms)` in this leader's term and
    /// waits until it is applied; returns how it applied and the leader time it carried.
    async fn propose_control(self: &Arc<Self>, deadline: Instant, make: impl FnOnce(i64) -> ControlCommand) -> Result<(ControlOutcome, i64), PartitionError> {
        let (rx, time) = self.start_control(deadline, make).await?;
        Ok((self.finish_control(rx, deadline).await?, time))
    }

    /// Proposes the control command `make(leader_time_ms)` in this leader's term;
    /// returns the channel its outcome comes on and the leader time it carried.
    async fn start_control(
        self: &Arc<Self>,
        deadline: Instant,
        make: impl FnOnce(i64) -> ControlCommand,
    ) -> Result<(oneshot::Receiver<Result<ApplyReply, PartitionError>>, i64), PartitionError> {
        let term = self.ready_term(deadline).await?;
        let mut w = self.writer.lock().await;
        if w.term != term {
            w.reset(term);
        }
        // As `control_entry`, but the command is made knowing the time it carries.
        let clock = self.group.shared.state().clock_ms;
        let time = now_ms().max(clock).max(w.last_time_ms);
        w.last_time_ms = time;
        w.last_tick = Some(Instant::now());
        let entry = ControlEntry { leader_time_ms: time, command: make(time) };
        let (_, rx) = self.propose(&mut w, term, EntryData::control(&entry), None, Vec::new(), 0).await?;
        Ok((rx, time))
    }

    /// How a proposed control entry applied.
    async fn finish_control(&self, rx: oneshot::Receiver<Result<ApplyReply, PartitionError>>, deadline: Instant) -> Result<ControlOutcome, PartitionError> {
        match self.outcome(rx, deadline).await? {
            ApplyReply::Control(outcome) => Ok(outcome),
            other => Err(PartitionError::Storage(format!("a control entry was applied as {other:?}"))),
        }
    }

    /// Serving-leader checks for a consumer-group request.
    async fn consumer_gate(&self, deadline: Instant) -> Result<(), PartitionError> {
        self.ready_term(deadline).await?;
        self.check_serving_leader()
    }

    /// Commits stream group `group`'s position in this partition.
    pub async fn commit_offset(self: &Arc<Self>, group: &str, generation: Option<u64>, offset: u64, timeout: Duration) -> Result<(), PartitionError> {
        let deadline = Instant::now() + timeout;
        self.consumer_gate(deadline).await?;
        let command = ControlCommand::CommitOffset { group: group.to_string(), generation, offset };
        match self.propose_control(deadline, |_| command).await?.0 {
            ControlOutcome::Committed(CommitResult::Committed) => Ok(()),
            ControlOutcome::Committed(CommitResult::StaleGeneration { current }) => {
                Err(PartitionError::StaleGeneration { group: group.to_string(), generation: generation.unwrap_or(0), current })
            }
            ControlOutcome::Committed(CommitResult::BeyondEnd { end }) => Err(PartitionError::OffsetOutOfRange { offset, start: self.log_start_offset(), end }),
            other => Err(PartitionError::Storage(format!("an offset commit was applied as {other:?}"))),
        }
    }

    /// Stream group `group`'s committed position here, with the high watermark and
    /// log start.
    pub async fn committed_offset(&self, group: &str, timeout: Duration) -> Result<(Option<CommittedOffset>, u64, u64), PartitionError> {
        self.consumer_gate(Instant::now() + timeout).await?;
        let st = self.group.shared.state();
        let committed =
            st.consumers.streams.get(group).map(|c| CommittedOffset { offset: c.offset, generation: c.generation, committed_at_ms: c.committed_at_ms });
        Ok((committed, st.next_offset, self.group.log.state().start_offset.max(st.retained.start_offset)))
    }

    /// What this leader knows of consumer groups (`only`, or all).
    pub async fn group_state(&self, only: Option<&str>, timeout: Duration) -> Result<GroupStateResponse, PartitionError> {
        self.consumer_gate(Instant::now() + timeout).await?;
        let st = self.group.shared.state();
        let wanted = |g: &String| only.is_none_or(|o| o == g);
        let streams = st
            .consumers
            .streams
            .iter()
            .filter(|(g, _)| wanted(g))
            .map(|(g, c)| StreamGroupState {
                group: g.clone(),
                committed: CommittedOffset { offset: c.offset, generation: c.generation, committed_at_ms: c.committed_at_ms },
            })
            .collect();
        let queues = st
            .consumers
            .queues
            .iter()
            .filter(|(g, _)| wanted(g))
            .map(|(g, q)| {
                let (leased, waiting, dead_lettering) = q.counts();
                QueueGroupState {
                    group: g.clone(),
                    floor: q.floor(&st.lanes, st.next_offset),
                    cursor: q.next_undelivered(&st.lanes, st.next_offset),
                    leased,
                    waiting,
                    dead_lettering,
                    members: q.members().map(|(m, n)| (m.to_string(), n)).collect(),
                    oldest_unsettled_delivery_ms: q.slots.values().next().map(|s| s.first_delivery_ms),
                    delivered_total: q.delivered_total,
                    redelivered_total: q.redelivered_total,
                    acked_total: q.acked_total,
                    dead_lettered_total: q.dead_lettered_total,
                }
            })
            .collect();
        Ok(GroupStateResponse {
            high_watermark: st.next_offset,
            log_start_offset: self.group.log.state().start_offset.max(st.retained.start_offset),
            streams,
            queues,
        })
    }

    /// Leases messages to a queue-group member: due retries and expired leases first,
    /// then never-delivered messages, up to the member's credit and the group's
    /// max-unacked; long-polls up to `max_wait` when there is nothing to lease.
    pub async fn queue_fetch(self: &Arc<Self>, req: &QueueFetch, config: &GroupConfig, max_deliveries: u32) -> Result<Leased, PartitionError> {
        let deadline = Instant::now() + req.max_wait;
        let request_deadline = deadline + crate::node::limits::QUEUE_PROPOSE_TIMEOUT;
        let lock = self.lease_lock(&req.group);
        let mut hw = self.group.high_watermark.clone();
        loop {
            let term = self.ready_term(request_deadline).await?;
            self.check_serving_leader()?;
            let mut overlay = lock.lock().await;
            if overlay.term != term {
                *overlay = LeaseOverlay { term, ..LeaseOverlay::default() };
            }
            let plan = self.plan_lease(req, config, max_deliveries, &mut overlay);
            if !plan.exhausted.is_empty() {
                let settles = plan
                    .exhausted
                    .iter()
                    .map(|(o, a)| (*o, *a, Settle::Expire { reason: format!("lease expired on the last allowed delivery ({a} of {max_deliveries})") }))
                    .collect();
                let group = req.group.clone();
                self.propose_control(request_deadline, |_| ControlCommand::QueueSettle { group, member: String::new(), settles }).await?;
            }
            let has_new = plan.new.iter().any(|(_, from, until)| until > from);
            if plan.redeliver.is_empty() && !has_new && !plan.create {
                drop(overlay);
                if plan.stall.is_some() || Instant::now() >= deadline {
                    return Ok(Leased {
                        leases: Vec::new(),
                        lease_deadline_ms: 0,
                        high_watermark: plan.high_watermark,
                        stall: plan.stall,
                        batches: Vec::new(),
                    });
                }
                // Nothing to lease yet: wait for new messages, a retry coming due, a
                // pending lease applying, or the end of the poll.
                let wake = plan
                    .next_due_ms
                    .map(|t| Instant::now() + Duration::from_millis(t.saturating_sub(now_ms()).max(1) as u64))
                    .unwrap_or(deadline)
                    .min(deadline);
                hw.borrow_and_update();
                tokio::select! {
                    changed = hw.changed() => if changed.is_err() { return Err(PartitionError::NotLeader { leader: None }) },
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = self.queue_activity.notified() => {}
                }
                continue;
            }
            // Read the new ranges' batches, highest lane first, up to about max_bytes
            // (at least one batch); a range is cut where the bytes ran out.
            let mut batches: BTreeMap<u64, Bytes> = BTreeMap::new();
            let mut new = plan.new.clone();
            let mut bytes = 0u64;
            for (lane, from, until) in new.iter_mut() {
                if bytes >= req.max_bytes {
                    *until = *from;
                    continue;
                }
                let segments: Vec<(u64, u64)> = self.group.shared.state().lanes.lane_segments(*lane, *from, *until).collect();
                *until = self.read_lane(&segments, *from, *until, req.max_bytes, &mut bytes, &mut batches).await?;
            }
            new.retain(|(_, from, until)| until > from);
            let has_new = !new.is_empty();
            // Sabotage `ignore-schedule`: scheduled messages leased whatever their time.
            let defer = !crate::sabotage::active(crate::sabotage::Sabotage::IgnoreSchedule);
            let (deferred, keys) = lease_notes(&batches, &new, now_ms(), defer, config.ordered == 1);
            let new_until: Vec<(u8, u64)> = new.iter().map(|(l, _, u)| (*l, *u)).collect();
            let (group, member, redeliver, start, timeout) =
                (req.group.clone(), req.member.clone(), plan.redeliver.clone(), plan.start, config.lease_timeout_ms);
            let (rx, time) = self
                .start_control(request_deadline, |time| ControlCommand::QueueLeaseLanes {
                    group,
                    member,
                    deadline_ms: time.saturating_add(timeout as i64),
                    start,
                    new,
                    redeliver,
                    deferred,
                    keys,
                })
                .await?;
            let count = if has_new { plan.new_count } else { 0 } + plan.redeliver.len() as u32;
            let outcome = if plan.create {
                // The group's first lease creates it: the next plan needs it applied.
                let outcome = self.finish_control(rx, request_deadline).await;
                drop(overlay);
                outcome?
            } else {
                overlay.add(&req.member, &new_until, &plan.redeliver, count);
                drop(overlay);
                // The overlay entry is removed by a task of its own: a request cancelled
                // now (its connection closed) must not leave it behind, or its offsets
                // would never be redelivered in this term.
                let (tx, done) = oneshot::channel();
                let (me, lock, member, redeliver) = (self.clone(), lock.clone(), req.member.clone(), plan.redeliver.clone());
                tokio::spawn(async move {
                    let outcome = me.finish_control(rx, request_deadline).await;
                    lock.lock().await.remove(term, &member, &redeliver, count);
                    me.queue_activity.notify_waiters();
                    let _ = tx.send(outcome);
                });
                done.await.map_err(|_| PartitionError::OutcomeUnknown { leader: None })??
            };
            let ControlOutcome::Leased(leased) = outcome else {
                return Err(PartitionError::Storage(format!("a lease was applied as {outcome:?}")));
            };
            let mut per_lane = [0u64; LANES];
            {
                let st = self.group.shared.state();
                for (o, _) in &leased {
                    per_lane[usize::from(st.lanes.lane_of(*o)).min(LANES - 1)] += 1;
                }
            }
            crate::metrics::queue_delivered(&self.topic, &req.group, &per_lane, leased.iter().filter(|(_, a)| *a > 1).count() as u64);
            if leased.is_empty() {
                continue; // created the group, or raced with another entry: plan again
            }
            let leased = if crate::sabotage::active(crate::sabotage::Sabotage::ForgetDeliveryCounts) {
                // Sabotage: attempts as this leader counted them since it began leading.
                let mut counts = self.sabotage_attempts.lock().expect("sabotage lock poisoned");
                if counts.0 != term {
                    *counts = (term, HashMap::new());
                }
                leased
                    .into_iter()
                    .map(|(o, _)| {
                        let n = counts.1.entry((req.group.clone(), o)).or_insert(0);
                        *n += 1;
                        (o, *n)
                    })
                    .collect()
            } else {
                leased
            };
            self.read_leased(&leased, &mut batches).await?;
            let offsets: Vec<u64> = leased.iter().map(|(o, _)| *o).collect();
            let served = batches.into_iter().filter(|(base, b)| covers(&offsets, *base, b)).map(|(_, b)| b).collect();
            return Ok(Leased {
                leases: leased.into_iter().map(|(offset, attempt)| Lease { offset, attempt }).collect(),
                lease_deadline_ms: time.saturating_add(timeout as i64),
                high_watermark: plan.high_watermark,
                stall: plan.stall,
                batches: served,
            });
        }
    }

    /// What one lease round would take for `req`, from the applied state: the member's
    /// credit (its request, less what it holds against the group's max-unacked) shared
    /// among the lanes with messages due or new, by the lanes' weights; within a lane,
    /// due retries and expired leases first, then new messages in offset order.
    fn plan_lease(&self, req: &QueueFetch, config: &GroupConfig, max_deliveries: u32, overlay: &mut LeaseOverlay) -> Plan {
        let now = now_ms();
        let st = self.group.shared.state();
        let hw = st.next_offset;
        let empty = |start: u64, stall: Option<Stall>, next_due_ms: Option<i64>, create: bool| Plan {
            start,
            new: Vec::new(),
            new_count: 0,
            redeliver: Vec::new(),
            exhausted: Vec::new(),
            stall,
            high_watermark: hw,
            next_due_ms,
            create,
        };
        let Some(q) = st.consumers.queues.get(&req.group) else {
            let start = match req.start {
                QueueStart::Earliest => self.group.log.state().start_offset.max(st.retained.start_offset),
                QueueStart::Latest => hw,
            };
            return empty(start, None, None, true);
        };
        let held = q.leased_by(&req.member) + overlay.by_member.get(&req.member).copied().unwrap_or(0);
        let credit = req.max_messages.min(config.max_unacked.saturating_sub(held));
        let start = q.cursors[0];
        if credit == 0 {
            self.stalled(
                &req.group,
                &req.member,
                "max_unacked",
                held,
                "the member holds its group's max_unacked leases here; it is sent nothing more from this partition until it settles some",
            );
            return empty(start, Some(Stall::MaxUnacked), None, false);
        }
        // Due offsets per lane (retries whose time came, leases that ran out).
        let mut due: [Vec<u64>; LANES] = Default::default();
        let mut exhausted = Vec::new();
        for offset in q.due(now, QUEUE_REDELIVER_SCAN_MAX) {
            if overlay.redelivering.contains(&offset) {
                continue;
            }
            let slot = &q.slots[&offset];
            if let SlotState::Leased { member, .. } = &slot.state {
                let what = "a lease ran out unsettled: the member is slow or gone; the message is delivered again";
                self.stalled(&req.group, member, "lease_expired", offset, what);
                if slot.attempts >= max_deliveries {
                    exhausted.push((offset, slot.attempts));
                    continue;
                }
            }
            let lane = usize::from(st.lanes.lane_of(offset)).min(LANES - 1);
            if due[lane].len() < credit as usize {
                due[lane].push(offset);
            }
        }
        // New messages per lane, from the lane's cursor after the pending leases, up to
        // the credit and the group's window.
        let pending_total: u32 = overlay.by_member.values().sum();
        let mut room = crate::partition::consumers::QUEUE_WINDOW_MAX.saturating_sub(q.slots.len() as u64 + u64::from(pending_total));
        let cursors: [u64; LANES] = std::array::from_fn(|l| overlay.cursors[l].filter(|_| overlay.pending > 0).unwrap_or(q.cursors[l]).max(q.cursors[l]));
        let mut fresh = [0u64; LANES];
        let single_lane = st.lanes.only_lane_zero(cursors.iter().copied().min().unwrap_or(hw), hw);
        for l in 0..LANES {
            if single_lane && l > 0 {
                break;
            }
            let mut n = 0u64;
            for (from, until) in st.lanes.lane_segments(l as u8, cursors[l], hw) {
                n += until - from;
                if n >= u64::from(credit) {
                    break;
                }
            }
            fresh[l] = n.min(u64::from(credit)).min(room);
        }
        let window_full = room == 0 && (0..LANES).any(|l| st.lanes.next_in_lane(l as u8, cursors[l], hw).is_some());
        let available: [u64; LANES] = std::array::from_fn(|l| due[l].len() as u64 + fresh[l]);
        let shares = weighted_shares(&mut overlay.lane_credit, &available, &req.lane_weights, u64::from(credit));
        let mut redeliver = Vec::new();
        let mut new = Vec::new();
        let mut new_count = 0u32;
        for l in (0..LANES).rev() {
            let mut share = shares[l];
            let r = (share as usize).min(due[l].len());
            redeliver.extend_from_slice(&due[l][..r]);
            share -= r as u64;
            let n = share.min(room);
            if n == 0 {
                continue;
            }
            room -= n;
            // The range from the cursor that holds `n` offsets of this lane.
            let mut left = n;
            let mut until = cursors[l];
            for (from, to) in st.lanes.lane_segments(l as u8, cursors[l], hw) {
                let take = (to - from).min(left);
                until = from + take;
                left -= take;
                if left == 0 {
                    break;
                }
            }
            if until > cursors[l] {
                new.push((l as u8, cursors[l], until));
                new_count += (n - left) as u32;
            }
        }
        let stall = (window_full && new.is_empty() && redeliver.is_empty()).then_some(Stall::Window);
        if stall.is_some() {
            self.stalled(
                &req.group,
                &req.member,
                "window",
                q.slots.len(),
                "the group holds its window of unsettled messages here; nothing new is leased until some are settled",
            );
        }
        Plan { start, new, new_count, redeliver, exhausted, stall, high_watermark: hw, next_due_ms: q.next_due(), create: false }
    }

    /// Reads the batches of one lane's new range (`segments`, within `from..until`) into
    /// `batches`, while `bytes` stays within `max_bytes` (at least one batch overall);
    /// returns where the range ends after the cut.
    async fn read_lane(
        &self,
        segments: &[(u64, u64)],
        from: u64,
        until: u64,
        max_bytes: u64,
        bytes: &mut u64,
        batches: &mut BTreeMap<u64, Bytes>,
    ) -> Result<u64, PartitionError> {
        for &(seg_from, seg_to) in segments {
            let mut next = seg_from;
            while next < seg_to {
                let entries = self.entries_from(next, QUEUE_READ_CHUNK_BYTES.min(max_bytes)).await?;
                if entries.is_empty() {
                    // The log ends before the range does (it cannot, below the high
                    // watermark): lease what was read.
                    return Ok(next.max(from));
                }
                for e in entries {
                    if e.meta.end_offset() <= next {
                        continue;
                    }
                    if e.meta.base_offset >= seg_to {
                        next = seg_to;
                        break;
                    }
                    next = e.meta.end_offset();
                    if e.meta.kind != KIND_BATCH {
                        continue;
                    }
                    if *bytes > 0 && *bytes + e.payload.len() as u64 > max_bytes {
                        return Ok(e.meta.base_offset.max(from));
                    }
                    *bytes += e.payload.len() as u64;
                    batches.insert(e.meta.base_offset, e.payload);
                    if next >= seg_to {
                        break;
                    }
                }
            }
        }
        Ok(until)
    }

    /// A delivery to `member` of `group` held back (or a lease of it run out), for
    /// `reason`: counted, and said in the log at most every `STALL_LOG_EVERY_MS` per
    /// partition.
    fn stalled(&self, group: &str, member: &str, reason: &'static str, at: impl std::fmt::Display, what: &str) {
        crate::metrics::queue_stall(&self.topic, group, reason);
        let now = now_ms();
        let last = self.stall_logged_at_ms.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) >= STALL_LOG_EVERY_MS
            && self.stall_logged_at_ms.compare_exchange(last, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed).is_ok()
        {
            tracing::warn!(partition = %self.name(), group, member, reason, at = %at, "queue delivery stalled: {what}");
        }
    }

    /// Adds to `batches` the stored batch holding each leased offset not yet covered.
    async fn read_leased(&self, leased: &[(u64, u32)], batches: &mut BTreeMap<u64, Bytes>) -> Result<(), PartitionError> {
        let offsets: Vec<u64> = leased.iter().map(|(o, _)| *o).collect();
        self.batches_holding(&offsets, batches).await
    }

    /// Adds to `batches` (by base offset) the stored batch holding each of `offsets`
    /// not yet covered.
    /// The newest timestamp of the batch holding `offset` (producer clock), if the log
    /// holds it: what the lag-age gauges measure ages from.
    pub async fn timestamp_at(&self, offset: u64) -> Result<Option<i64>, PartitionError> {
        let entries = self.entries_from(offset, 1).await?;
        Ok(entries.iter().find(|e| e.meta.kind == KIND_BATCH && e.meta.base_offset <= offset && e.meta.end_offset() > offset).map(|e| e.meta.max_timestamp_ms))
    }

    pub async fn batches_holding(&self, offsets: &[u64], batches: &mut BTreeMap<u64, Bytes>) -> Result<(), PartitionError> {
        for offset in offsets {
            let covered = batches.range(..=*offset).next_back().is_some_and(|(base, b)| batch_end(*base, b) > *offset);
            if covered {
                continue;
            }
            for e in self.entries_from(*offset, 1).await? {
                if e.meta.kind == KIND_BATCH && e.meta.base_offset <= *offset && e.meta.end_offset() > *offset {
                    batches.insert(e.meta.base_offset, e.payload);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Records a member's answers about leased messages, once committed.
    pub async fn queue_settle(
        self: &Arc<Self>,
        group: &str,
        member: &str,
        items: &[SettleItem],
        config: &GroupConfig,
        max_deliveries: u32,
        timeout: Duration,
    ) -> Result<Vec<SettleOutcome>, PartitionError> {
        let deadline = Instant::now() + timeout;
        self.consumer_gate(deadline).await?;
        // What each verb becomes, judged against the current attempts; the fold checks
        // again against the state the entry meets.
        let attempts: Vec<u32> = {
            let st = self.group.shared.state();
            let q = st.consumers.queues.get(group);
            items.iter().map(|i| q.and_then(|q| q.slots.get(&i.offset)).map_or(i.attempt, |s| s.attempts)).collect()
        };
        let now = now_ms();
        let mut planned = Vec::with_capacity(items.len());
        for (item, attempts) in items.iter().zip(&attempts) {
            let settle = match &item.verb {
                SettleVerb::Ack => Settle::Ack,
                SettleVerb::Nack { delay_ms, reason, class } => {
                    let delay = match delay_ms {
                        Some(d) => u64::from(*d).min(config.retry_max_ms),
                        None => rand::rng().random_range(0..=config.retry_bound_ms(*attempts)),
                    };
                    Settle::Nack {
                        not_before_ms: now.saturating_add(delay as i64),
                        reason: reason.clone(),
                        class: class.clone(),
                        dead_letter: *attempts >= max_deliveries,
                    }
                }
                SettleVerb::Term { reason, class } => Settle::Term { reason: reason.clone(), class: class.clone() },
                SettleVerb::Extend { ms } => Settle::Extend { deadline_ms: now.saturating_add(ms.map_or(config.lease_timeout_ms, u64::from) as i64) },
            };
            planned.push((item.offset, item.attempt, settle));
        }
        if crate::sabotage::active(crate::sabotage::Sabotage::AckWithoutRecording) && planned.iter().all(|(_, _, s)| matches!(s, Settle::Ack)) {
            // Sabotage: acks answered without being recorded.
            return Ok(planned.iter().map(|_| SettleOutcome::Acked).collect());
        }
        let command = ControlCommand::QueueSettle { group: group.to_string(), member: member.to_string(), settles: planned.clone() };
        let (outcome, _) = self.propose_control(deadline, |_| command).await?;
        let ControlOutcome::Settled(results) = outcome else {
            return Err(PartitionError::Storage(format!("a settle was applied as {outcome:?}")));
        };
        let outcomes: Vec<SettleOutcome> = planned
            .iter()
            .zip(results)
            .zip(&attempts)
            .map(|(((_, _, settle), result), attempts)| match (result, settle) {
                (SettleResult::Done, Settle::Ack) => SettleOutcome::Acked,
                (SettleResult::Done, Settle::Nack { dead_letter: true, .. } | Settle::Term { .. } | Settle::Expire { .. }) => SettleOutcome::DeadLettering,
                (SettleResult::Done, Settle::Nack { not_before_ms, .. }) => SettleOutcome::Retrying { attempt: attempts + 1, not_before_ms: *not_before_ms },
                (SettleResult::Done, Settle::Extend { deadline_ms }) => SettleOutcome::Extended { deadline_ms: *deadline_ms },
                (SettleResult::AlreadySettled, _) => SettleOutcome::AlreadySettled,
                (SettleResult::NotDelivered, _) => SettleOutcome::NotDelivered,
                (SettleResult::StaleLease { attempts }, _) => SettleOutcome::StaleLease { attempts },
                (SettleResult::DeadLettering, _) => SettleOutcome::AlreadyDeadLettering,
            })
            .collect();
        crate::metrics::queue_settled(&self.topic, group, &outcomes);
        let parked: Vec<u64> = {
            let st = self.group.shared.state();
            let q = st.consumers.queues.get(group);
            planned
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| matches!(o, SettleOutcome::Retrying { .. }))
                .map(|((offset, ..), _)| *offset)
                .filter(|o| q.is_some_and(|q| q.holds_back_others(*o)))
                .collect()
        };
        for offset in parked {
            self.stalled(
                group,
                member,
                "key_parked",
                offset,
                "a nacked message holds its key's later messages back until it is acked or dead-lettered; other keys flow",
            );
        }
        if outcomes.iter().any(|o| matches!(o, SettleOutcome::Retrying { .. } | SettleOutcome::DeadLettering)) {
            // A retry may be due sooner than a waiting fetch planned for.
            self.queue_activity.notify_waiters();
        }
        Ok(outcomes)
    }
}

/// A message decided for the dead-letter topic, with everything its failure record
/// says.
#[derive(Debug, Clone)]
pub struct DeadLetterJob {
    pub group: String,
    pub offset: u64,
    pub slot: Slot,
}

impl Partition {
    /// Whether this node is the partition's serving leader (leads, with its own term's
    /// entry applied and a quorum heard within the lease) right now.
    pub fn serving_now(&self) -> bool {
        let applied_own_term = {
            let term = {
                use openraft::async_runtime::watch::WatchReceiver;
                self.group.raft.metrics().borrow_watched().current_term
            };
            self.group.shared.applied().borrow().is_some_and(|l| l.leader_id.term == term)
        };
        // A quiesced leader's lease has run out by design; nothing changed since it
        // served last, so its gauges stand.
        let quiesced_leader = self.group.sleep.quiet().is_some_and(|q| q.leader == self.node_id);
        applied_own_term && (quiesced_leader || self.check_serving_leader().is_ok())
    }

    /// Messages waiting to be dead-lettered, oldest first per group, at most `max`.
    pub fn dead_letter_jobs(&self, max: usize) -> Vec<DeadLetterJob> {
        let st = self.group.shared.state();
        let mut out = Vec::new();
        for (group, q) in &st.consumers.queues {
            for offset in q.dead_lettering().take(max.saturating_sub(out.len())) {
                out.push(DeadLetterJob { group: group.clone(), offset, slot: q.slots[&offset].clone() });
            }
        }
        out
    }

    /// Expires, into the dead-letter topic, leases that ran out on the last allowed
    /// delivery (a queue fetch does this too; this catches groups nobody fetches for).
    pub async fn expire_exhausted(self: &Arc<Self>, max_deliveries: u32, timeout: Duration) -> Result<usize, PartitionError> {
        let now = now_ms();
        let work: Vec<(String, Vec<(u64, u32)>)> = {
            let st = self.group.shared.state();
            st.consumers
                .queues
                .iter()
                .map(|(g, q)| {
                    let due = q.due(now, QUEUE_REDELIVER_SCAN_MAX);
                    let exhausted = due
                        .into_iter()
                        .filter_map(|o| {
                            let slot = &q.slots[&o];
                            (matches!(slot.state, SlotState::Leased { .. }) && slot.attempts >= max_deliveries).then_some((o, slot.attempts))
                        })
                        .collect::<Vec<_>>();
                    (g.clone(), exhausted)
                })
                .filter(|(_, e)| !e.is_empty())
                .collect()
        };
        let mut n = 0;
        for (group, exhausted) in work {
            n += exhausted.len();
            let settles = exhausted
                .iter()
                .map(|(o, a)| (*o, *a, Settle::Expire { reason: format!("lease expired on the last allowed delivery ({a} of {max_deliveries})") }))
                .collect();
            let deadline = Instant::now() + timeout;
            self.propose_control(deadline, |_| ControlCommand::QueueSettle { group, member: String::new(), settles }).await?;
        }
        Ok(n)
    }

    /// Settles messages of `group` whose dead letters are committed; returns how many
    /// it settled (0 for a repeat).
    pub async fn dead_lettered(self: &Arc<Self>, group: &str, offsets: Vec<u64>, timeout: Duration) -> Result<u32, PartitionError> {
        let command = ControlCommand::QueueDeadLettered { group: group.to_string(), offsets };
        match self.propose_control(Instant::now() + timeout, |_| command).await?.0 {
            ControlOutcome::DeadLettered(n) => Ok(n),
            other => Err(PartitionError::Storage(format!("a dead-lettered entry was applied as {other:?}"))),
        }
    }
}

/// One walk over the batches read for a lease: `(offset, not_before_ms)` of the records
/// in `new`'s ranges whose scheduled time is after `now` (when `defer`), and `(offset,
/// key hash)` of the keyed ones (when `ordered`), both ascending. A batch is walked only
/// when it can hold something asked for (scheduled records need its `SCHEDULED`
/// attribute).
/// What a lease entry says about its new ranges beyond the ranges themselves:
/// `(deferred, keys)` as `QueueLeaseLanes` carries them.
type LeaseNotes = (Vec<(u64, i64)>, Vec<(u64, u64)>);

fn lease_notes(batches: &BTreeMap<u64, Bytes>, new: &[(u8, u64, u64)], now: i64, defer: bool, ordered: bool) -> LeaseNotes {
    let (mut deferred, mut keys) = (Vec::new(), Vec::new());
    for (base, bytes) in batches {
        let Ok(view) = keel_protocol::BatchView::parse(bytes.clone()) else { continue };
        let scheduled = defer && view.header().attributes.scheduled();
        if !scheduled && !ordered {
            continue;
        }
        for record in view.records().filter_map(Result::ok) {
            let offset = base + u64::from(record.offset_delta);
            if !new.iter().any(|(_, from, until)| (*from..*until).contains(&offset)) {
                continue;
            }
            if let Some(at) = record.deliver_at_ms().filter(|at| scheduled && *at > now) {
                deferred.push((offset, at));
            }
            if let Some(key) = record.key.filter(|_| ordered) {
                keys.push((offset, key_hash(key)));
            }
        }
    }
    deferred.sort_unstable();
    keys.sort_unstable();
    (deferred, keys)
}

/// One past the last offset of a stored batch.
fn batch_end(base: u64, batch: &Bytes) -> u64 {
    base + u64::from(keel_protocol::BatchHeader::parse(batch).map_or(1, |h| h.record_count))
}

/// Whether the batch at `base` holds any of `offsets` (sorted or not).
fn covers(offsets: &[u64], base: u64, batch: &Bytes) -> bool {
    let end = batch_end(base, batch);
    offsets.iter().any(|o| (base..end).contains(o))
}

/// Per group, the lock serialising its lease proposals in one partition.
pub type LeaseLocks = std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<LeaseOverlay>>>>;

/// A queue group's leases proposed by this leader and not yet applied (one term's):
/// the next lease is planned on top of them, so members' fetches pipeline instead of
/// each waiting for the previous lease to commit. The fold applies leases in log order,
/// so a lease planned from the overlay's cursors meets exactly those cursors. It also
/// keeps the lanes' weighted-round-robin credit (this leader's, not replicated).
#[derive(Debug, Default)]
pub struct LeaseOverlay {
    term: u64,
    /// Lease proposals not yet applied.
    pending: usize,
    /// Per lane, the cursor after them, while any is pending.
    cursors: [Option<u64>; LANES],
    /// Offsets they redeliver.
    redelivering: HashSet<u64>,
    /// Messages they lease, per member.
    by_member: HashMap<String, u32>,
    /// Smooth weighted round robin state per lane (see [`weighted_shares`]).
    lane_credit: [i64; LANES],
}

impl LeaseOverlay {
    fn add(&mut self, member: &str, new_until: &[(u8, u64)], redeliver: &[u64], count: u32) {
        self.pending += 1;
        for (lane, until) in new_until {
            self.cursors[usize::from(*lane).min(LANES - 1)] = Some(*until);
        }
        self.redelivering.extend(redeliver.iter().copied());
        *self.by_member.entry(member.to_string()).or_default() += count;
    }

    fn remove(&mut self, term: u64, member: &str, redeliver: &[u64], count: u32) {
        if self.term != term {
            return; // a newer term reset the overlay
        }
        self.pending -= 1;
        for o in redeliver {
            self.redelivering.remove(o);
        }
        if let Some(n) = self.by_member.get_mut(member) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                self.by_member.remove(member);
            }
        }
        if self.pending == 0 {
            self.cursors = [None; LANES];
        }
    }
}

/// Shares `budget` deliveries among lanes with `available` messages, in proportion to
/// their `weights`, by smooth weighted round robin: per delivery every lane with
/// messages left gains its weight, the lane with the most credit (the higher on a tie)
/// takes the delivery and pays the total weight. `credit` carries over between rounds,
/// so even one delivery per round serves every lane in proportion over time; a lane
/// with nothing available has its credit reset.
pub fn weighted_shares(credit: &mut [i64; LANES], available: &[u64; LANES], weights: &[u64; LANES], budget: u64) -> [u64; LANES] {
    let mut shares = [0u64; LANES];
    let mut left = *available;
    for l in 0..LANES {
        if left[l] == 0 {
            credit[l] = 0;
        }
    }
    let active = left.iter().filter(|n| **n > 0).count();
    if active <= 1 {
        if let Some(l) = (0..LANES).find(|l| left[*l] > 0) {
            shares[l] = left[l].min(budget);
        }
        return shares;
    }
    for _ in 0..budget {
        let total: i64 = (0..LANES).filter(|l| left[*l] > 0).map(|l| weights[l].max(1) as i64).sum();
        if total == 0 {
            break;
        }
        let mut pick = None;
        for l in (0..LANES).rev() {
            if left[l] == 0 {
                continue;
            }
            credit[l] += weights[l].max(1) as i64;
            if pick.is_none_or(|p: usize| credit[l] > credit[p]) {
                pick = Some(l);
            }
        }
        let p = pick.expect("a lane has messages left");
        credit[p] -= total;
        left[p] -= 1;
        shares[p] += 1;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(step: u64) -> [u64; LANES] {
        std::array::from_fn(|l| 1 + step * l as u64)
    }

    #[test]
    fn busy_lanes_share_deliveries_by_weight_even_one_delivery_per_round() {
        let mut credit = [0i64; LANES];
        let mut available = [0u64; LANES];
        available[0] = u64::MAX / 2;
        available[9] = u64::MAX / 2;
        let mut got = [0u64; LANES];
        for _ in 0..1_100 {
            let s = weighted_shares(&mut credit, &available, &weights(1), 1);
            for l in 0..LANES {
                got[l] += s[l];
            }
        }
        assert_eq!((got[9], got[0]), (1_000, 100), "weights 10 : 1");
        let big = weighted_shares(&mut [0; LANES], &available, &weights(1), 1_100);
        assert_eq!((big[9], big[0]), (1_000, 100), "the same in one round");
    }

    #[test]
    fn an_urgent_message_goes_first_and_the_rest_of_the_budget_to_the_backlog() {
        let mut available = [0u64; LANES];
        available[0] = 1_000_000;
        available[9] = 1;
        let mut credit = [0i64; LANES];
        let s = weighted_shares(&mut credit, &available, &weights(1), 100);
        assert_eq!((s[9], s[0]), (1, 99));
        // Equal weights (step 0): round robin.
        available[9] = 1_000;
        let s = weighted_shares(&mut [0; LANES], &available, &weights(0), 100);
        assert_eq!((s[9], s[0]), (50, 50));
        // One lane: all of it, up to what it has.
        let mut one = [0u64; LANES];
        one[3] = 7;
        assert_eq!(weighted_shares(&mut [0; LANES], &one, &weights(1), 100)[3], 7);
    }
}
