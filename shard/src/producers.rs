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
//!
//! **A batch refused without being appended must not put the ones behind it out of order.**
//! A producer keeps up to five batches in flight; when this partition refuses the next one for
//! a reason the client retries (this node stopped leading, a leadership handover, too few
//! replicas in sync, storage), the batches already on their way arrive with sequences past
//! the one it expects. Kafka answers those OUT_OF_ORDER_SEQUENCE_NUMBER, and librdkafka takes
//! that answer to a batch that is not its oldest in flight as "renumber everything": it bumps
//! its epoch and sends every batch it holds again under new sequences, including one this
//! partition appended and could not acknowledge (its leader stepped down before the commit):
//! stored twice, unrecognisable. So a refusal is remembered ([`ProducerStates::note_refused`])
//! and a batch that skips exactly the sequence refused gets the same retriable answer
//! ([`ShardError::AfterRefusal`]): the client retries the refused batch first and the rest in
//! order, under the same epoch, and a retry of an appended batch is recognised.

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
    /// The batch expected next was refused (nothing appended): its first sequence and why.
    /// Cleared by the next batch appended.
    refused: Option<(i32, Refusal)>,
}

/// Why a batch was refused before anything was appended, for one the client will retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Refusal {
    /// This replica does not lead, or is handing leadership over.
    NotLeader,
    /// Fewer replicas in sync than the write quorum.
    NotEnoughReplicas,
    /// The partition's storage failed.
    Storage,
}

impl Refusal {
    /// The refusal a produce error is, if the client retries it.
    pub fn of(error: &ShardError) -> Option<Refusal> {
        match error {
            ShardError::NotLeader { .. } | ShardError::ShuttingDown => Some(Refusal::NotLeader),
            ShardError::NotEnoughReplicas { .. } => Some(Refusal::NotEnoughReplicas),
            ShardError::Storage(_) => Some(Refusal::Storage),
            _ => None,
        }
    }
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
        if let Some((refused, refusal)) = producer.refused {
            // The batch refused comes again first; any other waits for it.
            let expected = producer.batches.back().map_or(refused, |b| following(b.last_sequence));
            if expected == refused && header.base_sequence != refused {
                return Err(ShardError::AfterRefusal {
                    refusal,
                    reason: format!(
                        "producer {} epoch {} sent sequence {} while its batch at sequence {refused} \
                         was refused ({refusal:?}) and not yet sent again",
                        header.producer_id, header.producer_epoch, header.base_sequence
                    ),
                });
            }
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

    /// Remembers that the batches of `headers` were refused for `refusal` and nothing of them
    /// appended: a producer's batch that was the next expected makes the later ones it has in
    /// flight wait for it (see the module docs). A producer not known yet is remembered from
    /// its refused sequence on.
    pub fn note_refused(&mut self, headers: &[BatchHeader], refusal: Refusal) {
        for header in headers {
            if header.producer_id < 0 || header.base_sequence < 0 {
                continue;
            }
            match self.producers.get_mut(&header.producer_id) {
                Some(producer) if header.producer_epoch == producer.epoch => {
                    let expected =
                        producer.batches.back().map_or(header.base_sequence, |b| following(b.last_sequence));
                    if header.base_sequence == expected {
                        producer.refused = Some((expected, refusal));
                    }
                }
                // An older epoch is fenced anyway; a newer one starts at 0 and is checked then.
                Some(_) => {}
                None => {
                    self.make_room();
                    let producer = self.producers.entry(header.producer_id).or_default();
                    producer.epoch = header.producer_epoch;
                    producer.refused = Some((header.base_sequence, refusal));
                }
            }
        }
    }

    /// Forgets the producer idle the longest when the partition holds its bound of them.
    fn make_room(&mut self) {
        if self.producers.len() >= PRODUCERS_PER_PARTITION_MAX {
            let idlest = self.producers.iter().min_by_key(|(_, p)| p.last_append).map(|(id, _)| *id);
            self.producers.remove(&idlest.expect("the map is full, so not empty"));
        }
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
            None => self.make_room(),
        }
        self.clock += 1;
        let producer = self.producers.entry(header.producer_id).or_default();
        producer.last_append = self.clock;
        producer.recorded_end = header.next_offset();
        producer.refused = None;
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
    fn a_refused_batch_holds_back_the_ones_behind_it_until_it_comes_again() {
        let mut states = ProducerStates::default();
        let first = batch(7, 0, 0, 2, 100);
        states.record(&first);
        // Sequences 2 and 3 were in flight; 2 is refused, nothing appended.
        states.note_refused(&[batch(7, 0, 2, 1, -1)], Refusal::NotLeader);
        match states.check(&batch(7, 0, 3, 1, -1)) {
            Err(ShardError::AfterRefusal { refusal: Refusal::NotLeader, reason }) => {
                assert!(reason.contains("sequence 3") && reason.contains("sequence 2"), "{reason}");
            }
            other => panic!("the batch behind a refused one waits for it: {other:?}"),
        }
        // A retry of a batch appended earlier is still recognised, not held back.
        assert_eq!(states.check(&first).unwrap(), Verdict::Duplicate { base_offset: 100, next_offset: 102 });
        // Refusing a batch that is not the next expected changes nothing: 2 still holds 3.
        states.note_refused(&[batch(7, 0, 9, 1, -1)], Refusal::Storage);
        assert!(matches!(states.check(&batch(7, 0, 3, 1, -1)), Err(ShardError::AfterRefusal { .. })));
        // The refused batch comes again and is appended; the next one follows as usual.
        let refused = batch(7, 0, 2, 1, 102);
        assert_eq!(states.check(&refused).unwrap(), Verdict::Append);
        states.record(&refused);
        assert_eq!(states.check(&batch(7, 0, 3, 1, -1)).unwrap(), Verdict::Append);
        assert!(matches!(states.check(&batch(7, 0, 5, 1, -1)), Err(ShardError::OutOfOrderSequence(_))));
        // A producer first seen refused: its later batches wait for that one too; a new epoch
        // starting at 0 does not.
        states.note_refused(&[batch(8, 3, 40, 1, -1)], Refusal::NotEnoughReplicas);
        assert!(matches!(
            states.check(&batch(8, 3, 41, 1, -1)),
            Err(ShardError::AfterRefusal { refusal: Refusal::NotEnoughReplicas, .. })
        ));
        assert_eq!(states.check(&batch(8, 3, 40, 1, -1)).unwrap(), Verdict::Append);
        assert_eq!(states.check(&batch(8, 4, 0, 1, -1)).unwrap(), Verdict::Append);
        // Retriable errors only.
        assert_eq!(Refusal::of(&ShardError::CorruptBatch("bad".into())), None);
        assert_eq!(Refusal::of(&ShardError::ShuttingDown), Some(Refusal::NotLeader));
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let mut states = ProducerStates::default();
        let near_end = batch(1, 0, i32::MAX - 1, 2, 0);
        states.record(&near_end);
        assert_eq!(states.check(&batch(1, 0, 0, 1, 2)).unwrap(), Verdict::Append);
    }
}
