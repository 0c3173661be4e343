//! The simulator's disk: a replica's log and hard state in memory, with what a crash does.
//!
//! Writes land in memory at once and become durable when a flush completes (its delay is the
//! world's choice). A crash keeps the durable batches, a random prefix of the unflushed ones
//! (appends are not atomic and their order is not kept, ALICE; recovery's CRC scan turns that
//! into a prefix), and may tear the last kept batch, which recovery then cuts off.

use bytes::Bytes;

use crate::batch;
use crate::epoch::{EpochHistory, EpochStart};
use crate::group::LogRead;
use crate::membership::Membership;

#[derive(Debug, Default, Clone)]
pub(crate) struct SimLog {
    /// Every batch, below `start` too: those stand for what retention removed (committed, the
    /// same on every replica), kept so that the checks compare whole logs. No read reaches
    /// them.
    pub batches: Vec<Bytes>,
    /// The log's first offset: retention removed what is below, or the log was started there.
    pub start: i64,
    /// End offset of each batch.
    pub ends: Vec<i64>,
    /// Batches below this index are fdatasync'ed.
    pub durable_count: usize,
    pub truncations: u64,
    /// Reads answered with nothing, per mille, as the daemon's reader answers a read of what
    /// is neither in its cache nor in its last catch-up read (it reads it meanwhile): the
    /// core must retry later, not stall or walk a follower back.
    pub refuse_reads_per_mille: u64,
    /// The refusals' own generator (xorshift), so they draw nothing from the world's.
    pub refusals: std::cell::Cell<u64>,
}

impl SimLog {
    pub fn end(&self) -> i64 {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn append(&mut self, bytes: Bytes) -> batch::BatchView {
        let view = batch::parse(&bytes).expect("the core appends only checked batches");
        assert_eq!(view.base_offset, self.end(), "the core appends at the log end");
        self.ends.push(view.end_offset());
        self.batches.push(bytes);
        view
    }

    /// Index of the first batch ending after `offset`.
    pub fn index_of(&self, offset: i64) -> usize {
        self.ends.partition_point(|end| *end <= offset)
    }

    pub fn truncate(&mut self, end_offset: i64) {
        let keep = self.index_of(end_offset);
        let boundary = keep == 0 && end_offset == 0 || keep > 0 && self.ends[keep - 1] == end_offset;
        assert!(boundary, "truncation at {end_offset} is not a batch boundary");
        self.batches.truncate(keep);
        self.ends.truncate(keep);
        self.durable_count = self.durable_count.min(keep);
        self.truncations += 1;
    }

    /// Starts the log, empty, at `start`: the committed batches below it, `committed`, stand
    /// for what the others hold there. Durable at once (the shell's reset is one step here).
    pub fn start_at(&mut self, start: i64, committed: &[Bytes]) {
        self.batches = committed.to_vec();
        self.ends = committed.iter().map(|b| batch::parse(b).expect("checked").end_offset()).collect();
        assert_eq!(self.end(), start, "the committed batches end at the new start");
        self.durable_count = self.batches.len();
        self.start = start;
        self.truncations += 1;
    }

    /// Marks durable what a flush up to `end_offset` covered.
    pub fn flushed(&mut self, end_offset: i64) {
        self.durable_count = self.durable_count.max(self.index_of(end_offset).min(self.batches.len()));
    }

    /// What survives a crash: durable batches, then `kept_unsynced` more, the last one torn
    /// (cut short) when `tear`. Then recovery: batches are read back until the first whose
    /// length or CRC fails, as dma does at open.
    pub fn crash(&mut self, kept_unsynced: usize, tear: bool) {
        let keep = (self.durable_count + kept_unsynced).min(self.batches.len());
        self.batches.truncate(keep);
        if tear && keep > self.durable_count {
            let last = self.batches.pop().expect("keep > durable_count >= 0");
            self.batches.push(last.slice(..last.len() / 2));
        }
        let valid = self
            .batches
            .iter()
            .take_while(|b| batch::parse(b).is_ok_and(|v| v.total_bytes == b.len()))
            .count();
        self.batches.truncate(valid);
        self.ends.truncate(valid);
        self.durable_count = valid;
        self.truncations = 0;
    }

    /// The epoch history read back from the batches, as recovery rebuilds it.
    pub fn epochs(&self) -> EpochHistory {
        let mut starts: Vec<EpochStart> = Vec::new();
        for b in &self.batches {
            let view = batch::parse(b).expect("recovered batches were checked");
            if starts.last().is_none_or(|s| s.epoch != view.leader_epoch) {
                starts.push(EpochStart { epoch: view.leader_epoch, start_offset: view.base_offset });
            }
        }
        EpochHistory::from_starts(starts).expect("a log's epochs grow")
    }
}

impl SimLog {
    /// The configuration batches read back, as recovery finds them.
    pub fn memberships(&self) -> Vec<(i64, Membership)> {
        let parsed =
            self.batches.iter().map(|b| (b, batch::parse(b).expect("recovered batches were checked")));
        parsed
            .filter_map(|(b, view)| Membership::from_batch(b, &view).map(|m| (view.base_offset, m)))
            .collect()
    }
}

impl LogRead for SimLog {
    fn read(&self, from_offset: i64, bytes_max: usize, batches: &mut Vec<Bytes>) {
        assert!(from_offset >= self.start, "read at {from_offset}, below the log's start {}", self.start);
        if self.refuse_reads_per_mille > 0 {
            let mut x = self.refusals.get().max(1);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.refusals.set(x);
            if x % 1000 < self.refuse_reads_per_mille {
                return;
            }
        }
        let mut bytes = 0;
        for b in &self.batches[self.index_of(from_offset).min(self.batches.len())..] {
            if bytes > 0 && bytes + b.len() > bytes_max {
                return;
            }
            bytes += b.len();
            batches.push(b.clone());
        }
    }
}
