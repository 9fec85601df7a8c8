//! Regression (found by keel-sim, seeds 340, 524, … of the first sweep): a leader whose
//! disk had not flushed an entry that both followers held durably crashed, restarted,
//! and with openraft's default `enable_leader_restore` resumed leading in its old term.
//! It wrote a different entry under the same log id; the follower holding the old one
//! took the two as matching, and committed entries diverged. Keel now turns leader
//! restore off: a restarted leader must win an election in a new term.

use std::time::Duration;

use keel_sim::batch;
use keel_sim::check::{Ack, Checker};
use keel_sim::network::Net;
use keel_sim::world::{World, NODES};
use openraft::async_runtime::watch::WatchReceiver;

const GROUP: u64 = 1;

async fn leader(world: &World) -> u64 {
    for _ in 0..1000 {
        if let Some(l) = world.leader(GROUP) {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader within 10 s");
}

/// Writes through whoever leads until it is acknowledged; returns the ack.
async fn write(world: &World, id: u64) -> Ack {
    for _ in 0..100 {
        let l = leader(world).await;
        let Some(r) = world.replica(l, GROUP) else { continue };
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(2), r.raft.client_write(batch(id))).await {
            return Ack { write: id, group: GROUP, index: reply.log_id.index, offset: reply.data.stored_at().expect("a stored batch") };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("write {id} was never acknowledged");
}

#[test]
fn a_leader_that_lost_an_unflushed_entry_in_a_crash_does_not_lead_on_in_its_old_term() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    keel_broker::replication::runtime::seed_thread(Some(7));
    rt.block_on(async {
        let world = World::new(Net::new(7), 1, 7).unwrap();
        for n in NODES {
            world.start(n).await.unwrap();
        }
        world.initialize().await.unwrap();
        let mut checker = Checker::default();
        for id in 1..=5 {
            let ack = write(&world, id).await;
            checker.acks.push(ack);
        }
        // The leader's disk stops flushing; the followers' do not. A write commits on
        // the two followers alone and is acknowledged.
        let old = leader(&world).await;
        let term = world.replica(old, GROUP).unwrap().raft.metrics().borrow_watched().current_term;
        world.stall_disk(old, true);
        let ack = write(&world, 6).await;
        checker.acks.push(ack);
        // Wait until the followers applied it (they hold it durably).
        for n in NODES.iter().filter(|n| **n != old) {
            let mut applied = world.replica(*n, GROUP).unwrap().applied;
            tokio::time::timeout(Duration::from_secs(5), applied.wait_for(|a| a.is_some_and(|a| a.index >= ack.index))).await.unwrap().unwrap();
        }
        checker.check(&world).unwrap();
        // Power cut on the leader: its unflushed copy of write 6 is gone. It restarts at once.
        assert!(world.crash(old, |_, _| 0).await);
        world.stall_disk(old, false);
        world.start(old).await.unwrap();
        let restarted = world.replica(old, GROUP).unwrap();
        assert!(restarted.log.state().last.is_none_or(|l| l.index < ack.index), "the crash took the leader's unflushed entry {}", ack.index);
        // Whoever leads next, in a newer term, writes on; nothing committed diverges.
        for id in 7..=12 {
            let a = write(&world, id).await;
            checker.acks.push(a);
            checker.check(&world).unwrap();
        }
        let now = leader(&world).await;
        let new_term = world.replica(now, GROUP).unwrap().raft.metrics().borrow_watched().current_term;
        assert!(new_term > term, "leadership after the restart is in a newer term ({new_term} > {term})");
        let last = checker.acks.last().unwrap().index;
        for n in NODES {
            let mut applied = world.replica(n, GROUP).unwrap().applied;
            tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|a| a.is_some_and(|a| a.index >= last))).await.unwrap().unwrap();
        }
        checker.check(&world).expect("committed entries agree and every acknowledged write is where it was acknowledged");
        checker.check_all_acked_present().unwrap();
        world.shutdown().await;
    });
}
