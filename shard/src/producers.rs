//! Idempotent producers: per (producer id, epoch) and partition, the sequence numbers of the
//! last [`BATCHES_KEPT`] batches, so a retried batch is recognised and not appended twice.
//!
//! The rules are Kafka's. A batch whose producer id is -1 is not idempotent. For a known
//! producer, a batch must carry the sequence after the last one (else
//! OUT_OF_ORDER_SEQUENCE_NUMBER), or repeat one of the last five batches exactly (a duplicate:
//! answered with the offsets it got the first time, nothing appended). An older epoch is fenced
//! (INVALID_PRODUCER_EPOCH); a newer epoch starts again at sequence 0. A producer with no state
//! here (new, or idle for longer than the history rebuilt at start-up) may start at any
//! sequence, as in Kafka since KIP-360.
//!
//! The state is rebuilt from the log when a partition opens: the batch headers of the newest
//! segments, at least [`REBUILD_SCAN_BYTES`] of them, carry every field it needs.

use std::collections::{HashMap, VecDeque};

use pyralog_dma::batch::BatchHeader;

use crate::ShardError;

/// Batches remembered per producer, as Kafka's max.in.flight.requests.per.connection allows.
pub const BATCHES_KEPT: usize = 5;
/// Bytes of recent log scanned to rebuild producer state when a partition opens.
pub const REBUILD_SCAN_BYTES: u64 = 64 << 20;
/// Producers remembered per partition. A new one past it makes the partition forget the one
/// that appended least recently (Kafka expires idle producers after a day instead); a
/// forgotten producer is treated as new, so only its retries of batches written before it
/// was forgotten would go unrecognised. It bounds what clients choosing producer ids can
/// make a partition keep: about 300 bytes each.
pub const PRODUCERS_PER_PARTITION_MAX: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeenBatch {
    first_sequence: i32,
    last_sequence: i32,
    base_offset: i64,
    next_offset: i64,
}

#[derive(Debug, Default, Clone)]
struct Producer {
    epoch: i16,
    batches: VecDeque<SeenBatch>,
    /// The offset after the last batch recorded: a batch below it was recorded already.
    recorded_end: i64,
    /// When it last appended, on the partition's `clock`.
    last_append: u64,
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Append,
    /// Already appended at these offsets.
    Duplicate {
        base_offset: i64,
        next_offset: i64,
    },
}

#[derive(Debug, Default, Clone)]
pub struct ProducerStates {
    producers: HashMap<i64, Producer>,
    /// Counts appends, to find the producer idle the longest.
    clock: u64,
}

fn last_sequence(header: &BatchHeader) -> i32 {
    // Sequences wrap from i32::MAX to 0.
    ((i64::from(header.base_sequence) + i64::from(header.last_offset_delta)) % (i64::from(i32::MAX) + 1))
        as i32
}

fn following(sequence: i32) -> i32 {
    if sequence == i32::MAX {
        0
    } else {
        sequence + 1
    }
}

impl ProducerStates {
    pub fn check(&self, header: &BatchHeader) -> Result<Verdict, ShardError> {
        if header.producer_id < 0 || header.base_sequence < 0 {
            return Ok(Verdict::Append);
        }
        let Some(producer) = self.producers.get(&header.producer_id) else { return Ok(Verdict::Append) };
        if header.producer_epoch < producer.epoch {
            return Err(ShardError::InvalidProducerEpoch(format!(
                "producer {} epoch {} is older than its current epoch {}",
                header.producer_id, header.producer_epoch, producer.epoch
            )));
        }
        if header.producer_epoch > producer.epoch {
            if header.base_sequence != 0 {
                return Err(ShardError::OutOfOrderSequence(format!(
                    "producer {} starts epoch {} at sequence {}, not 0",
                    header.producer_id, header.producer_epoch, header.base_sequence
                )));
            }
            return Ok(Verdict::Append);
        }
        let last = last_sequence(header);
        if let Some(seen) = producer
            .batches
            .iter()
            .find(|b| b.first_sequence == header.base_sequence && b.last_sequence == last)
        {
            return Ok(Verdict::Duplicate { base_offset: seen.base_offset, next_offset: seen.next_offset });
        }
        let expected = producer.batches.back().map_or(header.base_sequence, |b| following(b.last_sequence));
        if header.base_sequence != expected {
            return Err(ShardError::OutOfOrderSequence(format!(
                "producer {} epoch {} sent sequence {}, expected {expected}",
                header.producer_id, header.producer_epoch, header.base_sequence
            )));
        }
        Ok(Verdict::Append)
    }

    /// The state of the producers that wrote `headers` only: what checking a payload's
    /// batches in turn needs, without copying every producer of the partition.
    pub fn of(&self, headers: &[BatchHeader]) -> ProducerStates {
        let producers = headers
            .iter()
            .filter_map(|h| self.producers.get_key_value(&h.producer_id))
            .map(|(id, p)| (*id, p.clone()))
            .collect();
        ProducerStates { producers, clock: self.clock }
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Records an appended batch; `header` carries the offset it was given.
    pub fn record(&mut self, header: &BatchHeader) {
        if header.producer_id < 0 || header.base_sequence < 0 {
            return;
        }
        match self.producers.get(&header.producer_id) {
            // A replicated partition's leader records a batch when it proposes it and again
            // when its replica's worker appends it, possibly several proposals later: the
            // second time changes nothing (a partition's offsets only grow between rebuilds of
            // this state).
            Some(producer) if header.base_offset < producer.recorded_end => return,
            Some(_) => {}
            None if self.producers.len() >= PRODUCERS_PER_PARTITION_MAX => {
                let idlest = self.producers.iter().min_by_key(|(_, p)| p.last_append).map(|(id, _)| *id);
                self.producers.remove(&idlest.expect("the map is full, so not empty"));
            }
            None => {}
        }
        self.clock += 1;
        let producer = self.producers.entry(header.producer_id).or_default();
        producer.last_append = self.clock;
        producer.recorded_end = header.next_offset();
        if header.producer_epoch != producer.epoch {
            producer.epoch = header.producer_epoch;
            producer.batches.clear();
        }
        if producer.batches.len() == BATCHES_KEPT {
            producer.batches.pop_front();
        }
        producer.batches.push_back(SeenBatch {
            first_sequence: header.base_sequence,
            last_sequence: last_sequence(header),
            base_offset: header.base_offset,
            next_offset: header.next_offset(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_forgets_the_producer_idle_longest_past_its_bound() {
        let mut states = ProducerStates::default();
        for id in 0..PRODUCERS_PER_PARTITION_MAX as i64 {
            states.record(&batch(id, 0, 0, 1, id));
        }
        // Producer 0 appends again: producer 1 is now the one idle longest.
        states.record(&batch(0, 0, 1, 1, 5000));
        states.record(&batch(99_999, 0, 0, 1, 5001));
        assert_eq!(states.len(), PRODUCERS_PER_PARTITION_MAX);
        // Producer 1 is forgotten: a batch at any sequence is new to it.
        assert_eq!(states.check(&batch(1, 0, 7, 1, -1)).unwrap(), Verdict::Append);
        // Producer 0 is still known: its retry is recognised.
        assert_eq!(
            states.check(&batch(0, 0, 1, 1, -1)).unwrap(),
            Verdict::Duplicate { base_offset: 5000, next_offset: 5001 }
        );
        // Checking a payload copies only its own producers.
        assert_eq!(states.of(&[batch(0, 0, 2, 1, -1), batch(12345, 0, 0, 1, -1)]).len(), 1);
    }

    fn batch(
        producer_id: i64,
        epoch: i16,
        base_sequence: i32,
        records: i32,
        base_offset: i64,
    ) -> BatchHeader {
        BatchHeader {
            base_offset,
            total_bytes: 100,
            leader_epoch: 0,
            attributes: 0,
            last_offset_delta: records - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id,
            producer_epoch: epoch,
            base_sequence,
            record_count: records,
        }
    }

    #[test]
    fn sequences_must_follow_and_retries_are_recognised() {
        let mut states = ProducerStates::default();
        let first = batch(7, 0, 0, 10, 100);
        assert_eq!(states.check(&first).unwrap(), Verdict::Append);
        states.record(&first);
        // A retry of the same batch.
        assert_eq!(states.check(&first).unwrap(), Verdict::Duplicate { base_offset: 100, next_offset: 110 });
        // A gap.
        assert!(matches!(states.check(&batch(7, 0, 11, 1, -1)), Err(ShardError::OutOfOrderSequence(_))));
        let second = batch(7, 0, 10, 5, 110);
        assert_eq!(states.check(&second).unwrap(), Verdict::Append);
        states.record(&second);
        // Only the last five batches are remembered.
        for i in 0..5 {
            let next = batch(7, 0, 15 + i, 1, 115 + i64::from(i));
            assert_eq!(states.check(&next).unwrap(), Verdict::Append);
            states.record(&next);
        }
        assert!(states.check(&first).is_err(), "the first batch is out of the window");
        // Fencing: an older epoch is refused; a newer one restarts at 0.
        assert!(matches!(states.check(&batch(7, -1, 20, 1, -1)), Err(ShardError::InvalidProducerEpoch(_))));
        assert!(matches!(states.check(&batch(7, 1, 5, 1, -1)), Err(ShardError::OutOfOrderSequence(_))));
        assert_eq!(states.check(&batch(7, 1, 0, 1, -1)).unwrap(), Verdict::Append);
        // Unknown producers and non-idempotent batches start anywhere.
        assert_eq!(states.check(&batch(8, 0, 42, 1, -1)).unwrap(), Verdict::Append);
        assert_eq!(states.check(&batch(-1, -1, -1, 1, -1)).unwrap(), Verdict::Append);
    }

    #[test]
    fn a_leader_recording_its_batches_twice_keeps_each_once() {
        // A replicated partition's leader records batches as it proposes them, and again as
        // its replica's worker appends them, which may trail several proposals behind.
        let mut states = ProducerStates::default();
        let batches: Vec<_> = (0..5).map(|i| batch(7, 0, 10 * i, 10, 100 + 10 * i64::from(i))).collect();
        for proposed in &batches[..3] {
            states.record(proposed);
        }
        for appended in &batches[..2] {
            states.record(appended);
        }
        states.record(&batches[3]);
        states.record(&batches[2]);
        states.record(&batches[4]);
        states.record(&batches[3]);
        states.record(&batches[4]);
        // The next sequence follows the last batch, and all five are recognised as retries.
        assert_eq!(states.check(&batch(7, 0, 50, 1, -1)).unwrap(), Verdict::Append);
        for (i, kept) in batches.iter().enumerate() {
            let base_offset = 100 + 10 * i as i64;
            let retried = Verdict::Duplicate { base_offset, next_offset: base_offset + 10 };
            assert_eq!(states.check(kept).unwrap(), retried, "batch {i}");
        }
        // Recorded again under a later epoch's batch, an older batch does not reset the epoch.
        let fenced = batch(7, 1, 0, 1, 150);
        states.record(&fenced);
        states.record(&batches[4]);
        assert!(matches!(states.check(&batch(7, 0, 50, 1, -1)), Err(ShardError::InvalidProducerEpoch(_))));
        assert_eq!(states.check(&batch(7, 1, 1, 1, -1)).unwrap(), Verdict::Append);
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let mut states = ProducerStates::default();
        let near_end = batch(1, 0, i32::MAX - 1, 2, 0);
        states.record(&near_end);
        assert_eq!(states.check(&batch(1, 0, 0, 1, 2)).unwrap(), Verdict::Append);
    }
}
