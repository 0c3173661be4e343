//! A partition's leader epochs as Kafka clients see them: the fencing of requests that name
//! an epoch (KIP-320) and the end offset of an epoch (OffsetForLeaderEpoch, KIP-101/KIP-279).
//!
//! A replicated partition's epoch is its replica's Raft term, the one stamped on every batch
//! its leader appends (`partitionLeaderEpoch`) and the one both protocols' metadata report
//! (`Shard::partition_leader`). A partition of one node has epoch 0 for ever: its log stamps 0
//! on every batch and metadata says 0.
//!
//! What this module is not: the epoch history itself (`pyralog_replication::epoch`, kept by the
//! replica) or the check that a replica leads (done with these, in the order Kafka does: the
//! epoch first, then leadership).
//!
//! Invariants: a request naming no epoch (-1) is never fenced; one naming the epoch the
//! partition has here always passes the epoch check; an epoch's end is never answered for an
//! epoch newer than the partition's, nor for one older than the history it holds.

use pyralog_replication::epoch::EpochHistory;

use crate::ShardError;

/// The epoch of every partition that is not replicated.
pub const SINGLE_NODE_EPOCH: i32 = 0;

/// Kafka's check of a request's `current_leader_epoch` against the epoch this replica knows
/// (`known`): below it the client is behind (FENCED_LEADER_EPOCH, it refreshes its metadata),
/// above it this replica is (UNKNOWN_LEADER_EPOCH, the client retries). -1 (or any negative)
/// asks for no check.
pub fn fence(topic: &str, partition: u32, known: i32, current_leader_epoch: i32) -> Result<(), ShardError> {
    assert!(known >= 0, "a partition's epoch is never negative, not {known}");
    if current_leader_epoch < 0 || current_leader_epoch == known {
        return Ok(());
    }
    let (topic, requested) = (topic.to_owned(), current_leader_epoch);
    Err(if current_leader_epoch < known {
        ShardError::FencedLeaderEpoch { topic, partition, requested, current: known }
    } else {
        ShardError::UnknownLeaderEpoch { topic, partition, requested, current: known }
    })
}

/// OffsetForLeaderEpoch on the partition's leader: the largest epoch at or below `requested`
/// that the log holds and the offset that epoch ends at (the start of the next epoch in
/// `history`, or `log_end` for the current epoch). `None` (Kafka's undefined epoch and offset)
/// for a negative epoch, one newer than `current`, or one older than the history.
pub fn end_of_epoch(
    history: &EpochHistory,
    current: i32,
    requested: i32,
    log_end: i64,
) -> Option<(i32, i64)> {
    assert!(log_end >= 0, "a log ends at a non-negative offset");
    if requested < 0 || requested > current {
        return None;
    }
    if requested == current {
        // The leader's own epoch runs to its log's end, even before its first batch is in.
        return Some((current, log_end));
    }
    let found = history.end_for(requested, log_end)?;
    assert!(found.0 <= requested, "end_for answers an epoch at or below the one asked");
    Some(found)
}

/// [`end_of_epoch`] for a partition of one node, whose only epoch, 0, spans its whole log.
pub fn end_of_epoch_single(requested: i32, log_end: i64) -> Option<(i32, i64)> {
    (requested == SINGLE_NODE_EPOCH).then_some((SINGLE_NODE_EPOCH, log_end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyralog_replication::epoch::EpochStart;

    fn history(pairs: &[(i32, i64)]) -> EpochHistory {
        let starts = pairs.iter().map(|&(epoch, start_offset)| EpochStart { epoch, start_offset }).collect();
        EpochHistory::from_starts(starts).expect("test histories grow")
    }

    #[test]
    fn fencing_follows_kafkas_rules() {
        assert_eq!(fence("t", 0, 5, -1), Ok(()));
        assert_eq!(fence("t", 0, 5, 5), Ok(()));
        assert!(matches!(
            fence("t", 0, 5, 4),
            Err(ShardError::FencedLeaderEpoch { requested: 4, current: 5, .. })
        ));
        assert!(matches!(
            fence("t", 0, 5, 6),
            Err(ShardError::UnknownLeaderEpoch { requested: 6, current: 5, .. })
        ));
        // A partition of one node: 0 passes, anything newer is unknown.
        assert_eq!(fence("t", 0, SINGLE_NODE_EPOCH, 0), Ok(()));
        assert!(matches!(fence("t", 0, SINGLE_NODE_EPOCH, 1), Err(ShardError::UnknownLeaderEpoch { .. })));
    }

    #[test]
    fn an_epoch_ends_where_the_next_one_starts() {
        // Epoch 1 from 0, epoch 3 (a leader killed in epoch 1, another elected) from 10, and
        // the current leader's epoch 6 from 25; the log ends at 40.
        let h = history(&[(1, 0), (3, 10), (6, 25)]);
        assert_eq!(end_of_epoch(&h, 6, 1, 40), Some((1, 10)));
        assert_eq!(end_of_epoch(&h, 6, 3, 40), Some((3, 25)));
        // An epoch the log holds nothing of: the largest below it.
        assert_eq!(end_of_epoch(&h, 6, 2, 40), Some((1, 10)));
        assert_eq!(end_of_epoch(&h, 6, 5, 40), Some((3, 25)));
        // The current epoch runs to the log's end.
        assert_eq!(end_of_epoch(&h, 6, 6, 40), Some((6, 40)));
    }

    #[test]
    fn unknown_epochs_have_no_end() {
        let h = history(&[(1, 0), (3, 10), (6, 25)]);
        assert_eq!(end_of_epoch(&h, 6, 7, 40), None, "newer than the leader's");
        assert_eq!(end_of_epoch(&h, 6, 0, 40), None, "older than the history");
        assert_eq!(end_of_epoch(&h, 6, -1, 40), None);
        // A leader whose epoch has no batch yet still answers its own epoch.
        assert_eq!(end_of_epoch(&h, 7, 7, 40), Some((7, 40)));
        assert_eq!(end_of_epoch(&h, 7, 6, 40), Some((6, 40)));
        assert_eq!(end_of_epoch(&EpochHistory::default(), 1, 0, 0), None);
    }

    #[test]
    fn a_single_node_partition_has_epoch_zero_only() {
        assert_eq!(end_of_epoch_single(0, 17), Some((0, 17)));
        assert_eq!(end_of_epoch_single(1, 17), None);
        assert_eq!(end_of_epoch_single(-1, 17), None);
    }
}
