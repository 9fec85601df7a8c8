//! Replica placement: which nodes hold each partition of a new topic.
//!
//! Partition `p` of a topic takes `replicas` consecutive nodes of the sorted member
//! list starting at `(offset + p) mod n`, where `offset` is the number of partitions
//! that exist already. The first replica is the preferred leader, so leaders rotate
//! over the nodes within a topic and across topics.

/// Replica lists for `partitions` partitions over `members`, `replicas` each.
/// `existing_partitions` shifts the rotation so successive topics start elsewhere.
pub fn place(members: &[u64], partitions: u32, replicas: u16, existing_partitions: u64) -> Vec<Vec<u64>> {
    let mut nodes = members.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    assert!(!nodes.is_empty(), "placement needs at least one member");
    assert!(usize::from(replicas) <= nodes.len(), "cannot place {replicas} replicas on {} nodes", nodes.len());
    let n = nodes.len() as u64;
    (0..u64::from(partitions))
        .map(|p| {
            let start = (existing_partitions + p) % n;
            (0..u64::from(replicas)).map(|r| nodes[((start + r) % n) as usize]).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_gets_distinct_replicas_and_leaders_spread_evenly() {
        let placed = place(&[3, 1, 2], 6, 3, 0);
        for replicas in &placed {
            let mut r = replicas.clone();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), 3, "distinct replicas: {replicas:?}");
        }
        let mut leaders = [0; 4];
        for replicas in &placed {
            leaders[replicas[0] as usize] += 1;
        }
        assert_eq!(&leaders[1..], &[2, 2, 2], "each node prefers two of six leaders");
    }

    #[test]
    fn successive_topics_start_their_rotation_where_the_last_ended() {
        let first = place(&[1, 2, 3], 1, 1, 0);
        let second = place(&[1, 2, 3], 1, 1, 1);
        assert_ne!(first[0][0], second[0][0]);
    }
}
