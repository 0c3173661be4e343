//! The epoch history of a replica's log: the start offset of every epoch present in it, as
//! Kafka's leader-epoch checkpoint keeps (KIP-101).
//!
//! An epoch's entries were all appended by that epoch's one leader, starting at one offset, so
//! two replicas holding entries of epoch e hold the same ones from that start up to the smaller
//! of their two ends; below that point their logs are equal (log matching). The largest epoch
//! both hold, cut at the smaller end, is where their logs diverge (KIP-279, which also covers
//! back-to-back leader changes, where the follower's last epoch is unknown to the leader).
//!
//! Invariants: epochs and start offsets strictly grow along the history; every start offset is
//! below the log end (an epoch with no entries is not kept).

/// One epoch and the offset of its first entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStart {
    pub epoch: i32,
    pub start_offset: i64,
}

/// The start offset of every epoch in the log, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochHistory {
    starts: Vec<EpochStart>,
    /// A copy of the last of `starts` (epoch -1 when there is none), kept inline: every
    /// heartbeat asks for the epoch at the log's end, and for thousands of groups the read
    /// of each one's heap vector is a cache miss the answer does not need.
    last: EpochStart,
}

const NO_EPOCH: EpochStart = EpochStart { epoch: -1, start_offset: 0 };

impl Default for EpochHistory {
    fn default() -> EpochHistory {
        EpochHistory { starts: Vec::new(), last: NO_EPOCH }
    }
}

impl EpochHistory {
    /// A history from entries read back at recovery; refused (None) unless they strictly grow.
    pub fn from_starts(starts: Vec<EpochStart>) -> Option<EpochHistory> {
        let grows =
            starts.windows(2).all(|w| w[0].epoch < w[1].epoch && w[0].start_offset < w[1].start_offset);
        (grows && starts.iter().all(|s| s.start_offset >= 0 && s.epoch >= 0))
            .then(|| EpochHistory { last: starts.last().copied().unwrap_or(NO_EPOCH), starts })
    }

    pub fn starts(&self) -> &[EpochStart] {
        &self.starts
    }

    pub fn last_epoch(&self) -> i32 {
        self.last.epoch
    }

    /// Records that an entry of `epoch` was appended at `offset`, the log's end before it.
    pub fn appended(&mut self, epoch: i32, offset: i64) {
        match self.starts.last() {
            Some(last) if last.epoch == epoch => {
                assert!(offset > last.start_offset, "appends only grow offsets");
            }
            Some(last) => {
                assert!(epoch > last.epoch, "epoch {epoch} appended after epoch {}", last.epoch);
                assert!(
                    offset > last.start_offset,
                    "offset {offset} below epoch start {}",
                    last.start_offset
                );
                self.starts.push(EpochStart { epoch, start_offset: offset });
            }
            None => self.starts.push(EpochStart { epoch, start_offset: offset }),
        }
        self.last = *self.starts.last().expect("pushed or already there");
    }

    /// Forgets every epoch that starts at or after `end_offset` (the log was cut there).
    pub fn truncate(&mut self, end_offset: i64) {
        let keep = self.starts.partition_point(|s| s.start_offset < end_offset);
        self.starts.truncate(keep);
        self.last = self.starts.last().copied().unwrap_or(NO_EPOCH);
    }

    /// The epoch of the entry holding `offset`, if the log (ending at `log_end`) holds it.
    pub fn epoch_at(&self, offset: i64, log_end: i64) -> Option<i32> {
        if offset < 0 || offset >= log_end {
            return None;
        }
        if self.last.epoch >= 0 && offset >= self.last.start_offset {
            return Some(self.last.epoch);
        }
        let after = self.starts.partition_point(|s| s.start_offset <= offset);
        after.checked_sub(1).map(|i| self.starts[i].epoch)
    }

    /// The start offset of `epoch`, if the log holds entries of it.
    pub fn start_of(&self, epoch: i32) -> Option<i64> {
        self.starts.iter().find(|s| s.epoch == epoch).map(|s| s.start_offset)
    }

    /// KIP-101's OffsetForLeaderEpoch: the largest epoch at or below `epoch` and its end offset
    /// (the next epoch's start, or `log_end`). None when the log holds no such epoch.
    pub fn end_for(&self, epoch: i32, log_end: i64) -> Option<(i32, i64)> {
        let after = self.starts.partition_point(|s| s.epoch <= epoch);
        let found = self.starts.get(after.checked_sub(1)?)?;
        let end = self.starts.get(after).map_or(log_end, |next| next.start_offset);
        Some((found.epoch, end))
    }

    /// Up to `count_max` of the last epochs that start below `end_offset`: what a follower
    /// sends a leader whose append it could not match at `end_offset`.
    pub fn tail_below(&self, end_offset: i64, count_max: usize) -> Vec<EpochStart> {
        let below = self.starts.partition_point(|s| s.start_offset < end_offset);
        self.starts[below.saturating_sub(count_max)..below].to_vec()
    }

    /// Where a follower whose history ends with `tail` (ending at `tail_end`) last agrees with
    /// this log (ending at `log_end`): the largest epoch in both, cut at the smaller end. When
    /// no epoch of the tail is known here, the tail's first start, to probe older epochs next.
    pub fn common_end(&self, log_end: i64, tail: &[EpochStart], tail_end: i64) -> i64 {
        for (i, theirs) in tail.iter().enumerate().rev() {
            let their_end = tail.get(i + 1).map_or(tail_end, |next| next.start_offset);
            if let Some(start) = self.start_of(theirs.epoch) {
                if start != theirs.start_offset {
                    // Impossible between honest replicas: the epoch's leader started it once.
                    return theirs.start_offset.min(start);
                }
                let (_, our_end) = self.end_for(theirs.epoch, log_end).expect("the epoch is present");
                return our_end.min(their_end);
            }
        }
        tail.first().map_or(0, |s| s.start_offset.min(tail_end)).min(log_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(pairs: &[(i32, i64)]) -> EpochHistory {
        let starts = pairs.iter().map(|&(epoch, start_offset)| EpochStart { epoch, start_offset }).collect();
        EpochHistory::from_starts(starts).expect("test histories grow")
    }

    #[test]
    fn end_for_answers_the_largest_epoch_at_or_below() {
        let h = history(&[(1, 0), (3, 10), (6, 25)]);
        assert_eq!(h.end_for(3, 40), Some((3, 25)));
        assert_eq!(h.end_for(5, 40), Some((3, 25)));
        assert_eq!(h.end_for(9, 40), Some((6, 40)));
        assert_eq!(h.end_for(0, 40), None);
        assert_eq!(h.epoch_at(9, 40), Some(1));
        assert_eq!(h.epoch_at(10, 40), Some(3));
        assert_eq!(h.epoch_at(40, 40), None);
    }

    #[test]
    fn common_end_handles_back_to_back_leader_changes() {
        // KIP-279: the follower got epoch 2's entries from a leader that lost them; the leader
        // has epochs 1 and 3. The follower's last epoch (2) is unknown to the leader: the
        // common point is the end of epoch 1 as the leader knows it, in one answer.
        let leader = history(&[(1, 0), (3, 8)]);
        let follower_tail =
            [EpochStart { epoch: 1, start_offset: 0 }, EpochStart { epoch: 2, start_offset: 6 }];
        assert_eq!(leader.common_end(20, &follower_tail, 12), 6);
        // The follower is behind in the same epoch: common is its own end.
        assert_eq!(leader.common_end(20, &[EpochStart { epoch: 3, start_offset: 8 }], 11), 11);
        // The follower has more of epoch 1 than the leader kept.
        assert_eq!(leader.common_end(20, &[EpochStart { epoch: 1, start_offset: 0 }], 15), 8);
        assert_eq!(leader.common_end(20, &[], 0), 0);
    }

    #[test]
    fn truncate_drops_epochs_starting_at_or_after_the_cut() {
        let mut h = history(&[(1, 0), (3, 10), (6, 25)]);
        h.truncate(25);
        assert_eq!(h.last_epoch(), 3);
        h.truncate(11);
        assert_eq!(h.last_epoch(), 3);
        h.truncate(10);
        assert_eq!(h.last_epoch(), 1);
        assert!(EpochHistory::from_starts(vec![
            EpochStart { epoch: 2, start_offset: 0 },
            EpochStart { epoch: 1, start_offset: 5 }
        ])
        .is_none());
    }
}
