//! The stream-group coordinator: membership, heartbeats, generations and server-side
//! partition assignment. It runs on the metadata leader; any other node answers
//! `NotLeader` pointing there (the client follows).
//!
//! Membership lives in the coordinator's memory, not in a log: a member that is not
//! heard from within its session timeout is removed, and a new coordinator (after a
//! metadata leader change) starts empty — members learn it from `UnknownMember` and
//! join again. Generations stay monotonic across coordinators without a write: a
//! generation is `(metadata term << 32) | counter`, and a new leader has a higher term.
//! Committed offsets are fenced by generation in each partition's fold, so a member of
//! an older generation cannot move a partition's offset once a newer one committed.
//!
//! Rebalancing is eager: any change of membership or subscriptions bumps the
//! generation and recomputes every assignment at once (round-robin over each topic's
//! partitions, members in id order); members learn it from their next heartbeat and join
//! again to get their new partitions, committing what they processed first. While the
//! news travels two members may read the same partition — at-least-once, never a gap.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keel_protocol::message::Assignment;

use super::limits::{COORDINATOR_GROUPS_MAX, GROUP_MEMBERS_MAX, SESSION_TIMEOUT_MAX, SESSION_TIMEOUT_MIN};

/// Why a coordinator request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordinatorError {
    #[error("member {member:?} is not in group {group:?} (its session timed out, or the coordinator moved); join again")]
    UnknownMember { group: String, member: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Full(String),
}

#[derive(Debug)]
struct Member {
    topics: Vec<String>,
    session_timeout: Duration,
    last_seen: Instant,
}

#[derive(Debug, Default)]
struct Group {
    /// The metadata term this group's generations were counted in.
    term: u64,
    counter: u32,
    members: BTreeMap<String, Member>,
    assignment: BTreeMap<String, Vec<(String, Vec<u32>)>>,
}

impl Group {
    fn generation(&self) -> u64 {
        (self.term << 32) | u64::from(self.counter)
    }

    /// A new generation: every member's partitions, round-robin per topic over the
    /// members subscribing to it (in id order).
    fn rebalance(&mut self, partitions_of: &dyn Fn(&str) -> u32) {
        self.counter = self.counter.wrapping_add(1);
        let mut topics: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (id, m) in &self.members {
            for t in &m.topics {
                topics.entry(t.as_str()).or_default().push(id.as_str());
            }
        }
        let mut assignment: BTreeMap<String, BTreeMap<String, Vec<u32>>> = BTreeMap::new();
        for (topic, members) in topics {
            for p in 0..partitions_of(topic) {
                let owner = members[p as usize % members.len()];
                assignment.entry(owner.to_string()).or_default().entry(topic.to_string()).or_default().push(p);
            }
        }
        self.assignment = self.members.keys().map(|id| (id.clone(), assignment.remove(id).map(|t| t.into_iter().collect()).unwrap_or_default())).collect();
    }
}

/// What a join answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub member: String,
    pub generation: u64,
    pub assignment: Vec<(String, Vec<u32>)>,
    pub members: u32,
    pub heartbeat_interval: Duration,
}

/// A member as `describe` shows it: id, time since last heard, assignment.
pub type MemberView = (String, Duration, Assignment);

/// The coordinator's state: every stream group with live members.
#[derive(Debug, Default)]
pub struct Coordinator {
    groups: Mutex<HashMap<String, Group>>,
}

/// How often a member heartbeats: a fifth of its session timeout, at most a second.
pub fn heartbeat_interval(session_timeout: Duration) -> Duration {
    (session_timeout / 5).min(Duration::from_secs(1))
}

impl Coordinator {
    /// Joins `member` (or a new member) to `group` for `topics`, in metadata term
    /// `term`; `partitions_of` counts a topic's partitions (0: no such topic).
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &self,
        now: Instant,
        term: u64,
        group: &str,
        member: Option<&str>,
        topics: &[String],
        session_timeout: Duration,
        partitions_of: &dyn Fn(&str) -> u32,
    ) -> Result<Joined, CoordinatorError> {
        if topics.is_empty() {
            return Err(CoordinatorError::Invalid("join with at least one topic".into()));
        }
        if let Some(t) = topics.iter().find(|t| partitions_of(t) == 0) {
            return Err(CoordinatorError::Invalid(format!("topic {t:?} does not exist")));
        }
        if !(SESSION_TIMEOUT_MIN..=SESSION_TIMEOUT_MAX).contains(&session_timeout) {
            return Err(CoordinatorError::Invalid(format!("session timeout {session_timeout:?} is outside {SESSION_TIMEOUT_MIN:?}..={SESSION_TIMEOUT_MAX:?}")));
        }
        let mut groups = self.groups.lock().expect("coordinator lock poisoned");
        if !groups.contains_key(group) && groups.len() >= COORDINATOR_GROUPS_MAX {
            return Err(CoordinatorError::Full(format!("the coordinator already tracks {COORDINATOR_GROUPS_MAX} stream groups with members")));
        }
        let g = groups.entry(group.to_string()).or_default();
        if g.term != term {
            // Built under another term (this node led before): start over.
            *g = Group { term, ..Group::default() };
        }
        let mut topics: Vec<String> = topics.to_vec();
        topics.sort();
        topics.dedup();
        let id = match member {
            Some(m) if g.members.contains_key(m) => m.to_string(),
            // An unknown id (from an earlier coordinator) joins as a new member under it.
            Some(m) => m.to_string(),
            None => format!("{group}-{:016x}", rand::random::<u64>()),
        };
        let changed = match g.members.get_mut(&id) {
            Some(m) => {
                m.last_seen = now;
                m.session_timeout = session_timeout;
                let changed = m.topics != topics;
                m.topics = topics;
                changed
            }
            None => {
                if g.members.len() >= GROUP_MEMBERS_MAX {
                    return Err(CoordinatorError::Full(format!("group {group:?} already has {GROUP_MEMBERS_MAX} members")));
                }
                g.members.insert(id.clone(), Member { topics, session_timeout, last_seen: now });
                true
            }
        };
        if changed {
            g.rebalance(partitions_of);
        }
        Ok(Joined {
            member: id.clone(),
            generation: g.generation(),
            assignment: g.assignment.get(&id).cloned().unwrap_or_default(),
            members: g.members.len() as u32,
            heartbeat_interval: heartbeat_interval(session_timeout),
        })
    }

    /// A member's heartbeat: `Ok((rebalance, current generation))`.
    pub fn heartbeat(&self, now: Instant, term: u64, group: &str, member: &str, generation: u64) -> Result<(bool, u64), CoordinatorError> {
        let mut groups = self.groups.lock().expect("coordinator lock poisoned");
        let unknown = || CoordinatorError::UnknownMember { group: group.to_string(), member: member.to_string() };
        let g = groups.get_mut(group).filter(|g| g.term == term).ok_or_else(unknown)?;
        let m = g.members.get_mut(member).ok_or_else(unknown)?;
        m.last_seen = now;
        Ok((g.generation() != generation, g.generation()))
    }

    /// A member leaves: its partitions are reassigned now.
    pub fn leave(&self, group: &str, member: &str, partitions_of: &dyn Fn(&str) -> u32) {
        let mut groups = self.groups.lock().expect("coordinator lock poisoned");
        if let Some(g) = groups.get_mut(group) {
            if g.members.remove(member).is_some() {
                g.rebalance(partitions_of);
            }
            if g.members.is_empty() {
                groups.remove(group);
            }
        }
    }

    /// Removes members not heard from within their session timeout; returns
    /// `(group, member)` of each removed.
    pub fn expire(&self, now: Instant, partitions_of: &dyn Fn(&str) -> u32) -> Vec<(String, String)> {
        let mut groups = self.groups.lock().expect("coordinator lock poisoned");
        let mut removed = Vec::new();
        for (name, g) in groups.iter_mut() {
            let dead: Vec<String> =
                g.members.iter().filter(|(_, m)| now.saturating_duration_since(m.last_seen) > m.session_timeout).map(|(id, _)| id.clone()).collect();
            if dead.is_empty() {
                continue;
            }
            for id in dead {
                g.members.remove(&id);
                removed.push((name.clone(), id));
            }
            g.rebalance(partitions_of);
        }
        groups.retain(|_, g| !g.members.is_empty());
        removed
    }

    /// A group's generation and members: `(member, since last heard, assignment)`.
    pub fn describe(&self, now: Instant, group: &str) -> Option<(u64, Vec<MemberView>)> {
        let groups = self.groups.lock().expect("coordinator lock poisoned");
        let g = groups.get(group)?;
        let members = g
            .members
            .iter()
            .map(|(id, m)| (id.clone(), now.saturating_duration_since(m.last_seen), g.assignment.get(id).cloned().unwrap_or_default()))
            .collect();
        Some((g.generation(), members))
    }

    /// Whether `group` has live members here.
    pub fn has_members(&self, group: &str) -> bool {
        self.groups.lock().expect("coordinator lock poisoned").get(group).is_some_and(|g| !g.members.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three(_: &str) -> u32 {
        3
    }

    const S: Duration = Duration::from_secs(3);

    #[test]
    fn members_split_the_partitions_and_a_join_bumps_the_generation() {
        let c = Coordinator::default();
        let t0 = Instant::now();
        let topics = vec!["orders".to_string()];
        let a = c.join(t0, 7, "g", Some("a"), &topics, S, &three).unwrap();
        assert_eq!(a.assignment, vec![("orders".to_string(), vec![0, 1, 2])]);
        assert_eq!(a.generation >> 32, 7, "the generation carries the metadata term");
        let b = c.join(t0, 7, "g", Some("b"), &topics, S, &three).unwrap();
        assert!(b.generation > a.generation);
        assert_eq!(b.assignment, vec![("orders".to_string(), vec![1])]);
        let (rebalance, generation) = c.heartbeat(t0, 7, "g", "a", a.generation).unwrap();
        assert!(rebalance && generation == b.generation, "a learns of the rebalance from its heartbeat");
        let a2 = c.join(t0, 7, "g", Some("a"), &topics, S, &three).unwrap();
        assert_eq!((a2.generation, a2.assignment), (b.generation, vec![("orders".to_string(), vec![0, 2])]), "a rejoin without change keeps the generation");
    }

    #[test]
    fn a_member_not_heard_within_its_session_is_removed_and_its_partitions_reassigned() {
        let c = Coordinator::default();
        let t0 = Instant::now();
        let topics = vec!["orders".to_string()];
        c.join(t0, 1, "g", Some("a"), &topics, S, &three).unwrap();
        let b = c.join(t0, 1, "g", Some("b"), &topics, S, &three).unwrap();
        assert!(c.expire(t0 + S, &three).is_empty(), "exactly the session timeout is not over it");
        c.heartbeat(t0 + Duration::from_secs(2), 1, "g", "b", b.generation).unwrap();
        assert_eq!(c.expire(t0 + S + Duration::from_millis(1), &three), vec![("g".to_string(), "a".to_string())]);
        let (rebalance, _) = c.heartbeat(t0 + S, 1, "g", "b", b.generation).unwrap();
        assert!(rebalance);
        let b2 = c.join(t0 + S, 1, "g", Some("b"), &topics, S, &three).unwrap();
        assert_eq!(b2.assignment, vec![("orders".to_string(), vec![0, 1, 2])]);
        assert!(matches!(c.heartbeat(t0, 1, "g", "a", 0), Err(CoordinatorError::UnknownMember { .. })));
    }

    #[test]
    fn a_new_term_starts_the_group_over_with_higher_generations() {
        let c = Coordinator::default();
        let t0 = Instant::now();
        let topics = vec!["orders".to_string()];
        let old = c.join(t0, 1, "g", Some("a"), &topics, S, &three).unwrap();
        assert!(matches!(c.heartbeat(t0, 2, "g", "a", old.generation), Err(CoordinatorError::UnknownMember { .. })));
        let new = c.join(t0, 2, "g", Some("a"), &topics, S, &three).unwrap();
        assert!(new.generation > old.generation);
    }

    #[test]
    fn bad_joins_are_refused() {
        let c = Coordinator::default();
        let none = |_: &str| 0;
        assert!(matches!(c.join(Instant::now(), 1, "g", None, &["x".to_string()], S, &none), Err(CoordinatorError::Invalid(_))));
        assert!(matches!(c.join(Instant::now(), 1, "g", None, &[], S, &three), Err(CoordinatorError::Invalid(_))));
        assert!(matches!(c.join(Instant::now(), 1, "g", None, &["x".to_string()], Duration::from_millis(1), &three), Err(CoordinatorError::Invalid(_))));
    }
}
