//! Pipelined AppendEntries: a leader sends a follower's next AppendEntries as soon as
//! openraft has entries for it, without waiting for the answers to the ones before.
//!
//! openraft's default `stream_append` sends one request and waits for its answer before
//! the next, so a follower holds at most one request per group: each batch waited for
//! the previous request's whole round (write, fsync, ack ledger, answer) before its own
//! began. Here up to [`APPEND_PIPELINE_DEPTH`] requests of one replication stream are in
//! flight; the follower's flusher then covers several of them with one fsync.
//!
//! **Order.** Raft needs a follower to handle a stream's requests in the order they
//! were sent; the transport runs each request's handler on its own task, so handlers
//! may start out of order. Every request carries `(stream, seq)`; the follower's
//! [`AppendStreams`] holds early arrivals until their predecessors have been handed
//! over, feeds them in `seq` order into `Raft::stream_append` (which submits them to
//! the Raft core in that order and answers in that order), and routes each answer back
//! to its request. The leader yields the answers in `seq` order too.
//!
//! **Streams.** A leader opens one stream per (group, follower) replication session;
//! a new stream id from the same node for the same group replaces the old stream on
//! the follower (the old stream's pending requests are answered with an error — those
//! still waiting for a predecessor too — and a late request of a replaced stream is
//! refused). A request is never held longer than `PIPELINED_APPEND_TIMEOUT`, after
//! which its leader has given up on it anyway: one waiting for a predecessor that
//! never comes (answered "unknown group" before the group opened here) would
//! otherwise hold its connection's request slot for good. Ids come from one counter per
//! process, seeded with the clock at start; a follower remembers the last
//! [`RETIRED_STREAMS_KEPT`] replaced ids, so an id is never taken for a new stream
//! after it was replaced, whichever way the sender's clock went across a restart.
//!
//! Heartbeats (`new_heartbeat_client`) are single requests and stay unpipelined.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use futures::stream::{FuturesOrdered, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError};
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use tokio::sync::{mpsc, oneshot};

use super::limits::{APPEND_PIPELINE_DEPTH, PIPELINED_APPEND_TIMEOUT, RETIRED_STREAMS_KEPT};
use super::network::{GroupNetwork, RemoteFailure};
use super::server::GroupRaft;
use super::wire::{GroupId, RaftReply};
use crate::replication::TypeConfig;

type LogId = openraft::LogId<openraft::vote::leader_id_std::CommittedLeaderId<u64>>;
type Request = AppendEntriesRequest<TypeConfig>;
type Answer = StreamAppendResult<TypeConfig>;
/// One request in flight: the last log id it covers, and its answer when it comes.
type InFlight = BoxFuture<'static, (Option<LogId>, Result<RaftReply, RPCError<TypeConfig>>)>;
type Results<'s> = BoxStream<'s, Result<Answer, RPCError<TypeConfig>>>;

/// A fresh stream id: one counter per process, seeded with the clock at first use.
fn next_stream_id() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let micros = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
        AtomicU64::new(micros.max(1))
    });
    next.fetch_add(1, Ordering::Relaxed)
}

/// The last log id a request covers: its last entry's, or its `prev_log_id` if empty.
fn last_of(req: &Request) -> Option<LogId> {
    req.entries.last().map(|e| e.log_id).or(req.prev_log_id)
}

/// The leader's side: `network`'s stream of requests, sent without waiting, answers in
/// order. Ends after the first error, conflict or partial success (as openraft's
/// sequential default does), or when the requests end and every answer is in.
pub(super) fn send<'s, S>(network: &GroupNetwork, input: S) -> BoxFuture<'s, Result<Results<'s>, RPCError<TypeConfig>>>
where
    S: futures::Stream<Item = Request> + Send + Unpin + 'static,
{
    let network = network.clone_for_stream();
    let stream = next_stream_id();
    Box::pin(async move {
        struct State<S> {
            input: S,
            input_done: bool,
            stopped: bool,
            seq: u64,
            inflight: FuturesOrdered<InFlight>,
        }
        let state = State { input, input_done: false, stopped: false, seq: 0, inflight: FuturesOrdered::new() };
        let network = Arc::new(network);
        let results = futures::stream::unfold(state, move |mut st| {
            let network = network.clone();
            async move {
                loop {
                    if st.stopped || (st.input_done && st.inflight.is_empty()) {
                        return None;
                    }
                    let room = !st.input_done && st.inflight.len() < APPEND_PIPELINE_DEPTH;
                    tokio::select! {
                        biased;
                        req = st.input.next(), if room => match req {
                            None => st.input_done = true,
                            Some(rpc) => {
                                let last = last_of(&rpc);
                                crate::metrics::replication_append_sent(!st.inflight.is_empty());
                                let (network, seq) = (network.clone(), st.seq);
                                st.seq += 1;
                                st.inflight.push_back(Box::pin(async move {
                                    (last, network.call_append(stream, seq, rpc, PIPELINED_APPEND_TIMEOUT).await)
                                }));
                            }
                        },
                        Some((last, reply)) = st.inflight.next(), if !st.inflight.is_empty() => {
                            let item = match reply {
                                Ok(RaftReply::AppendPipelined(Ok(answer))) => Ok(answer),
                                Ok(RaftReply::AppendPipelined(Err(why))) => Err(RPCError::Network(NetworkError::new(&RemoteFailure(why)))),
                                Ok(other) => Err(RPCError::Network(NetworkError::new(&RemoteFailure(format!("unexpected reply to a pipelined append: {other:?}"))))),
                                Err(e) => Err(e),
                            };
                            // Stop after anything but full success: the requests after it
                            // are moot (openraft starts a new stream from what was acked).
                            st.stopped = !matches!(&item, Ok(Ok(matched)) if *matched == last);
                            return Some((item, st));
                        }
                    }
                }
            }
        });
        Ok(Box::pin(results) as Results<'s>)
    })
}

/// What a handler waits for: the answer, or why there is none.
type Responder = oneshot::Sender<Result<Answer, String>>;

/// One replication stream on the follower.
struct StreamIn {
    id: u64,
    /// Guarded together: requests go to Raft in `seq` order with their responders queued
    /// in the same order.
    order: Mutex<Order>,
}

struct Order {
    sequencer: Sequencer<(Request, Responder)>,
    to_raft: mpsc::UnboundedSender<Request>,
    responders: Arc<Mutex<VecDeque<Responder>>>,
}

/// Puts a stream's requests back in `seq` order: holds early arrivals until their
/// predecessors have come, at most `2 × APPEND_PIPELINE_DEPTH` ahead of the next.
struct Sequencer<T> {
    next_seq: u64,
    early: BTreeMap<u64, T>,
}

impl<T> Sequencer<T> {
    fn new() -> Sequencer<T> {
        Sequencer { next_seq: 0, early: BTreeMap::new() }
    }

    /// Drops every early arrival (the stream was replaced: their predecessors will not
    /// come); returns how many there were.
    fn abandon(&mut self) -> usize {
        let n = self.early.len();
        self.early.clear();
        n
    }

    /// Takes item `seq`; returns the items now ready, in order (none if `seq` is early).
    fn accept(&mut self, seq: u64, item: T) -> Result<Vec<T>, String> {
        if seq < self.next_seq || self.early.contains_key(&seq) {
            return Err(format!("request {seq} arrived twice"));
        }
        if seq >= self.next_seq + 2 * APPEND_PIPELINE_DEPTH as u64 {
            return Err(format!("request {seq} is too far ahead of {}", self.next_seq));
        }
        self.early.insert(seq, item);
        let mut ready = Vec::new();
        while let Some(item) = self.early.remove(&self.next_seq) {
            self.next_seq += 1;
            ready.push(item);
        }
        Ok(ready)
    }
}

#[derive(Default)]
struct Streams {
    by_source: HashMap<(GroupId, u64), Arc<StreamIn>>,
    retired: HashMap<(GroupId, u64), VecDeque<u64>>,
}

/// The follower's side: the open replication streams, by (group, sending node).
#[derive(Default)]
pub struct AppendStreams {
    streams: Mutex<Streams>,
}

impl AppendStreams {
    /// Hands `rpc` (request `seq` of stream `stream` from node `from`, for `group`) to
    /// `raft` in stream order and waits for its answer. `hosted` says whether this node
    /// still hosts a group: opening a stream forgets the streams of groups it no longer
    /// hosts (deleted ones), whose tasks hold their Raft.
    pub(super) async fn append(
        &self,
        raft: &GroupRaft,
        (group, from): (GroupId, u64),
        (stream, seq): (u64, u64),
        rpc: Request,
        hosted: impl Fn(GroupId) -> bool,
    ) -> Result<Answer, String> {
        let s = self.stream(raft, group, from, stream, hosted)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut order = s.order.lock().expect("append stream lock poisoned");
            let ready = order.sequencer.accept(seq, (rpc, tx)).map_err(|e| format!("append stream {stream}: {e}"))?;
            for (rpc, responder) in ready {
                order.responders.lock().expect("responder queue lock poisoned").push_back(responder);
                if let Err(mpsc::error::SendError(_)) = order.to_raft.send(rpc) {
                    // The stream's Raft side ended (an earlier answer was an error): its
                    // queued responders are dropped with it, so this one's handler sees it.
                    order.responders.lock().expect("responder queue lock poisoned").pop_back();
                }
            }
        }
        // Bounded: a request whose predecessor never comes (answered "unknown group"
        // before this group opened here, or lost) would otherwise hold its connection's
        // request slot for good — the leader gave up on it after the same timeout.
        match tokio::time::timeout(PIPELINED_APPEND_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(format!("append stream {stream} ended before request {seq} was answered (replaced, or an earlier request failed)")),
            Err(_) => Err(format!("append stream {stream}: request {seq} not answered within {PIPELINED_APPEND_TIMEOUT:?} (a request before it never came)")),
        }
    }

    /// The stream `stream` of (`group`, `from`): the open one, or a new one replacing it.
    fn stream(&self, raft: &GroupRaft, group: GroupId, from: u64, stream: u64, hosted: impl Fn(GroupId) -> bool) -> Result<Arc<StreamIn>, String> {
        let mut streams = self.streams.lock().expect("append streams lock poisoned");
        let key = (group, from);
        if let Some(s) = streams.by_source.get(&key) {
            if s.id == stream {
                return Ok(s.clone());
            }
        }
        if streams.retired.get(&key).is_some_and(|r| r.contains(&stream)) {
            return Err(format!("append stream {stream} from node {from} for group {group} was replaced by a newer one"));
        }
        streams.by_source.retain(|(g, _), _| *g == group || hosted(*g));
        streams.retired.retain(|(g, _), _| *g == group || hosted(*g));
        let opened = Arc::new(open(raft, stream));
        let replaced = streams.by_source.insert(key, opened.clone());
        crate::metrics::append_stream_opened(streams.by_source.len());
        if let Some(old) = replaced {
            // Its early arrivals will never be released: answer their handlers now (an
            // error) instead of when they time out, and free the entries they hold.
            old.order.lock().expect("append stream lock poisoned").sequencer.abandon();
            let retired = streams.retired.entry(key).or_default();
            retired.push_back(old.id);
            if retired.len() > RETIRED_STREAMS_KEPT {
                retired.pop_front();
            }
        }
        Ok(opened)
    }
}

/// A new stream: its requests go to `raft.stream_append`, whose answers (in request
/// order) go to the responders queued in the same order.
fn open(raft: &GroupRaft, id: u64) -> StreamIn {
    let (to_raft, rx) = mpsc::unbounded_channel::<Request>();
    let responders: Arc<Mutex<VecDeque<Responder>>> = Arc::default();
    let input = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let answers = raft.stream_append(input);
    let queue = responders.clone();
    tokio::spawn(async move {
        let mut answers = std::pin::pin!(answers);
        while let Some(answer) = answers.next().await {
            let Some(responder) = queue.lock().expect("responder queue lock poisoned").pop_front() else { break };
            let _ = responder.send(answer.map_err(|fatal| fatal.to_string()));
        }
        // Whatever is still queued was not answered: dropping the responders tells
        // their handlers.
        queue.lock().expect("responder queue lock poisoned").clear();
    });
    StreamIn { id, order: Mutex::new(Order { sequencer: Sequencer::new(), to_raft, responders }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequencer_releases_requests_in_seq_order_whatever_order_they_arrive_in() {
        let mut s = Sequencer::new();
        assert_eq!(s.accept(2, "c").unwrap(), Vec::<&str>::new());
        assert_eq!(s.accept(1, "b").unwrap(), Vec::<&str>::new());
        assert_eq!(s.accept(0, "a").unwrap(), vec!["a", "b", "c"]);
        assert_eq!(s.accept(3, "d").unwrap(), vec!["d"]);
        assert_eq!(s.accept(5, "f").unwrap(), Vec::<&str>::new());
        assert_eq!(s.accept(4, "e").unwrap(), vec!["e", "f"]);
    }

    #[test]
    fn the_sequencer_refuses_a_repeated_request_and_one_too_far_ahead() {
        let mut s = Sequencer::new();
        s.accept(0, 0).unwrap();
        s.accept(2, 2).unwrap();
        assert!(s.accept(0, 0).unwrap_err().contains("twice"), "an already released seq");
        assert!(s.accept(2, 2).unwrap_err().contains("twice"), "an early seq held already");
        let far = 1 + 2 * APPEND_PIPELINE_DEPTH as u64;
        assert!(s.accept(far, 9).unwrap_err().contains("too far ahead"));
        assert_eq!(s.accept(1, 1).unwrap(), vec![1, 2], "the refusals changed nothing");
    }

    #[test]
    fn abandoning_a_replaced_stream_answers_the_handlers_waiting_for_a_predecessor() {
        // Requests 1 and 2 arrived, 0 never will (it was answered "unknown group" before
        // the group opened): their handlers wait on these receivers.
        let mut s = Sequencer::new();
        let (tx1, mut rx1) = oneshot::channel::<()>();
        let (tx2, mut rx2) = oneshot::channel::<()>();
        assert!(s.accept(1, tx1).unwrap().is_empty());
        assert!(s.accept(2, tx2).unwrap().is_empty());
        assert!(matches!(rx1.try_recv(), Err(oneshot::error::TryRecvError::Empty)), "held while early");
        assert_eq!(s.abandon(), 2);
        assert!(matches!(rx1.try_recv(), Err(oneshot::error::TryRecvError::Closed)), "released: the handler answers an error");
        assert!(matches!(rx2.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
    }

    #[test]
    fn stream_ids_only_grow_within_a_process() {
        let a = next_stream_id();
        let b = next_stream_id();
        assert!(b > a);
    }
}
