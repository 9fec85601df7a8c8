//! Samples every hosted Raft group into the metrics every `metrics::SAMPLE_INTERVAL`:
//! term, leadership, leader changes, under-replication, the partition fold's dedupe
//! state, and — for partitions this node leads — consumer groups' lag, leases and
//! retries, and dead-letter depth.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use openraft::async_runtime::watch::WatchReceiver;

use super::group::GroupHandle;
use super::reconcile::HostedPartitions;
use crate::metrics::{self, GroupSample, UNDER_REPLICATED_LAG_ENTRIES};

/// `g`'s sample now; `before` is its sample of the round before (leader changes are
/// counted against it).
fn sample(g: &GroupHandle, before: Option<&GroupSample>, is_partition: bool) -> GroupSample {
    let m = g.raft.metrics();
    let m = m.borrow_watched();
    let is_leader = m.state == openraft::ServerState::Leader;
    let leader_changed = before.is_some_and(|b| b.leader != m.current_leader && m.current_leader.is_some());
    let under_replicated = is_partition
        && is_leader
        && m.replication.as_ref().is_some_and(|r| {
            let last = m.last_log_index.unwrap_or(0);
            r.values().any(|matched| matched.is_none_or(|l| last.saturating_sub(l.index) > UNDER_REPLICATED_LAG_ENTRIES))
        });
    let (message_ids, message_id_bytes, producers) = if is_partition {
        let st = g.shared.state();
        (Some(st.message_ids.len() as u64), Some(st.message_ids.memory_bytes()), Some(st.producers.len() as u64))
    } else {
        (None, None, None)
    };
    GroupSample {
        group: g.id,
        term: m.current_term,
        leader: m.current_leader,
        is_leader,
        leader_changed,
        under_replicated,
        message_ids,
        message_id_bytes,
        producers,
    }
}

/// Messages of each lane a queue group was not delivered yet, for every lane the
/// partition has held messages of (lane 0 always).
fn lane_backlog(q: &crate::partition::consumers::QueueGroup, lanes: &crate::partition::lanes::LaneRuns, hw: u64) -> Vec<(u8, u64)> {
    (0..crate::partition::lanes::LANES as u8)
        .map(|l| (l, lanes.lane_segments(l, q.cursors[usize::from(l)], hw).map(|(a, b)| b - a).sum::<u64>()))
        .filter(|(l, _)| lanes.used(*l))
        .collect()
}

/// Consumer-group and dead-letter gauges of one partition, if this node leads it.
fn consumer_samples(p: &super::partition::Partition, now_ms: i64) -> Vec<metrics::ConsumerSample> {
    let dead_letter_topic = p.topic.ends_with(super::dead_letters::DEAD_LETTER_SUFFIX);
    {
        let st = p.group.shared.state();
        if st.consumers.streams.is_empty() && st.consumers.queues.is_empty() && !dead_letter_topic {
            return Vec::new();
        }
    }
    if !p.serving_now() {
        return Vec::new();
    }
    let st = p.group.shared.state();
    let hw = st.next_offset;
    let mut out = Vec::new();
    for (name, c) in &st.consumers.streams {
        out.push(metrics::ConsumerSample {
            group: p.group.id,
            topic: p.topic.clone(),
            consumer_group: name.clone(),
            lag: hw.saturating_sub(c.offset),
            leased: None,
            waiting: None,
            scheduled: None,
            parked_keys: None,
            oldest_unsettled_age_ms: None,
            behind_from: (c.offset < hw).then_some(c.offset),
            lag_age_ms: None,
            lane_backlog: Vec::new(),
        });
    }
    for (name, q) in &st.consumers.queues {
        let (leased, waiting, _) = q.counts();
        out.push(metrics::ConsumerSample {
            group: p.group.id,
            topic: p.topic.clone(),
            consumer_group: name.clone(),
            lag: hw.saturating_sub(q.floor(&st.lanes, hw)),
            leased: Some(leased),
            waiting: Some(waiting - q.scheduled() - q.blocked()),
            scheduled: Some(q.scheduled()),
            parked_keys: Some(q.parked_keys()),
            oldest_unsettled_age_ms: Some(
                q.slots.values().filter(|s| s.attempts > 0).map(|s| s.first_delivery_ms).min().map_or(0, |t| now_ms.saturating_sub(t).max(0) as u64),
            ),
            behind_from: Some(q.floor(&st.lanes, hw)).filter(|f| *f < hw),
            lag_age_ms: None,
            lane_backlog: lane_backlog(q, &st.lanes, hw),
        });
    }
    if dead_letter_topic {
        let start = p.group.log.state().start_offset;
        out.push(metrics::ConsumerSample {
            group: p.group.id,
            topic: p.topic.clone(),
            consumer_group: String::new(),
            lag: hw.saturating_sub(start),
            leased: None,
            waiting: None,
            scheduled: None,
            parked_keys: None,
            oldest_unsettled_age_ms: None,
            behind_from: (start < hw).then_some(start),
            lag_age_ms: None,
            lane_backlog: Vec::new(),
        });
    }
    out
}

/// Timestamps of the messages lag ages are measured from, per (Raft group, consumer
/// group), so a group that did not move costs no read; entries of groups not sampled in
/// a round are dropped (the cache is bounded by the groups sampled).
#[derive(Default)]
struct Timestamps {
    known: HashMap<(u64, String), (u64, i64)>,
    seen: HashSet<(u64, String)>,
}

impl Timestamps {
    async fn timestamp(&mut self, p: &super::partition::Partition, consumer_group: &str, offset: u64) -> Option<i64> {
        let key = (p.group.id, consumer_group.to_string());
        self.seen.insert(key.clone());
        if let Some((o, ts)) = self.known.get(&key) {
            if *o == offset {
                return Some(*ts);
            }
        }
        match p.timestamp_at(offset).await {
            Ok(Some(ts)) => {
                self.known.insert(key, (offset, ts));
                Some(ts)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(partition = %p.name(), offset, error = %e, "reading a timestamp for the lag age failed");
                None
            }
        }
    }

    fn retain_seen(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        self.known.retain(|k, _| seen.contains(k));
    }
}

/// Runs until aborted.
pub async fn run(metadata_group: GroupHandle, hosted: HostedPartitions) {
    // Each group's sample of the round before (gauges are set only when they change;
    // leader changes are counted against it).
    let mut previous: HashMap<u64, GroupSample> = HashMap::new();
    // Which parking (`Sleep::parking`) each group was in when sampled: a group still in
    // the same one has not woken since, so nothing in its sample can have moved.
    let mut parked_when_sampled: HashMap<u64, Option<u64>> = HashMap::new();
    let mut ages = Timestamps::default();
    // Consumer gauges this node set last round (to zero those it stops reporting).
    let mut reported: HashMap<(u64, String, String), Vec<u8>> = HashMap::new();
    let mut tick = tokio::time::interval(metrics::SAMPLE_INTERVAL);
    loop {
        tick.tick().await;
        let partitions: Vec<_> = hosted.read().expect("hosted lock poisoned").values().cloned().collect::<Vec<Arc<_>>>();
        let mut samples = vec![sample(&metadata_group, previous.get(&metadata_group.id), false)];
        // A parked replica's term, leader and dedupe state cannot move until it wakes:
        // its sample of the round before stands (no Raft metrics read for it).
        samples.extend(partitions.iter().map(|p| {
            let parking = p.group.sleep.parking();
            let unchanged = parking.is_some() && parked_when_sampled.get(&p.group.id) == Some(&parking);
            parked_when_sampled.insert(p.group.id, parking);
            match previous.get(&p.group.id) {
                Some(before) if unchanged => GroupSample { leader_changed: false, ..before.clone() },
                before => sample(&p.group, before, true),
            }
        }));
        metrics::record_groups(&samples, &previous);
        if let Some(share) = &metadata_group.log.config().tail_cache_share {
            metrics::tail_cache(share.holders(), share.total_bytes());
        }
        previous = samples.into_iter().map(|s| (s.group, s)).collect();
        parked_when_sampled.retain(|g, _| previous.contains_key(g));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let mut consumers = Vec::new();
        for p in &partitions {
            for mut s in consumer_samples(p, now) {
                s.lag_age_ms = Some(match s.behind_from {
                    None => 0,
                    Some(offset) => ages.timestamp(p, &s.consumer_group, offset).await.map_or(0, |ts| now.saturating_sub(ts).max(0) as u64),
                });
                consumers.push(s);
            }
        }
        ages.retain_seen();
        metrics::record_consumers(&consumers);
        let now_reported: HashMap<(u64, String, String), Vec<u8>> =
            consumers.iter().map(|s| ((s.group, s.topic.clone(), s.consumer_group.clone()), s.lane_backlog.iter().map(|(l, _)| *l).collect())).collect();
        for ((group, topic, consumer_group), lanes) in &reported {
            if !now_reported.contains_key(&(*group, topic.clone(), consumer_group.clone())) {
                metrics::zero_consumer(*group, topic, consumer_group, lanes);
            }
        }
        reported = now_reported;
    }
}
