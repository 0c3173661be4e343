//! A batching, pipelining producer for one topic.
//!
//! Each partition has at most one open batch. A record goes into its partition's batch; the
//! batch is sent when it reaches `batch_bytes`, or once `linger` has passed since its first
//! record (with a zero linger, by the `send` that opened it), provided its partition is under
//! `max_in_flight_per_partition`. There is no background thread: linger is checked on every
//! [`Producer::send`] and [`Producer::poll`], so a caller that goes idle calls `poll` (at the
//! latest by [`Producer::linger_deadline`]) or [`Producer::flush`].
//!
//! Sending is asynchronous: a full batch leaves with [`Transport::produce_async`] and the
//! producer carries on. Outcomes are collected in send order and handed, one [`DeliveryReport`]
//! per batch, to the callback given to [`Producer::new`], on the thread calling the producer.
//! Every batch gets exactly one report, failed batches included; [`Producer::flush`] also
//! returns an error if any batch failed since the previous flush.
//!
//! The transport is the native [`Client`] by default, or a [`super::KafkaClient`]: batching,
//! linger, partitioning, the in-flight window and the reports are this module's, whatever the
//! protocol underneath.
//!
//! Leader changes ([`super::failover`]): when a batch fails because its partition's leader
//! moved (over a transport that follows leaders), the producer settles every batch of that
//! partition in flight (they went to the same old leader), pauses, reads the metadata again and
//! sends those the old leader did not take again, in send order, on the new leader's
//! connection; the caller's thread waits meanwhile, as it waits for room. It gives up when the
//! retry budget is spent, failing those batches with `LeaderUnavailable`. A batch is reported
//! acknowledged only once a node acknowledged it. Under `Acks::None` nothing is retried (no
//! answer says the leader moved).
//!
//! Idempotence (`ProducerConfig::idempotent`, the default, with `Acks::Durable` over a
//! transport that hands out producer ids): the producer takes an id and epoch when it is made
//! and stamps each batch with them and the partition's next sequence number (RecordBatch v2's
//! producerId, producerEpoch and baseSequence, as a Kafka client does), so a batch sent again
//! that the old leader had already stored is recognised by the partition's leader, which
//! answers with the offsets it got the first time: each batch is stored once, in send order.
//! The broker remembers a producer's last five batches per partition, so at most five of a
//! partition's batches are in flight ([`IDEMPOTENT_IN_FLIGHT_MAX`]); and a partition's first
//! batch under an id goes alone (a leader takes an unknown producer's batch at any sequence,
//! so batches sent behind a refused first one could be stored ahead of it). A batch refused
//! as out of sequence while an earlier one of its partition is unanswered or refused (the
//! leader has not stored that one yet) is sent again after it. A batch that fails for
//! good leaves a gap in its partition's sequence: the next batch takes a new producer id, and
//! those already in flight behind the failed one may fail too (out of order). Without
//! idempotence a retried batch may be stored twice, and land after a later one the old leader
//! took (at least once).
//!
//! Invariants: at most `max_in_flight_batches` batches await acknowledgement (a send blocks on
//! the oldest beyond that) and at most one open batch per partition, so memory is bounded by
//! `(partitions + max_in_flight_batches) * batch_bytes` (a batch in flight keeps its bytes
//! until it is reported, to be sent again). Batches of one partition are sent in order on one
//! connection, so the broker appends them in send order; a fail-over sends a partition's
//! batches again only once none of them is still on its way.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::batch::{BatchBuilder, IdempotentProducer, BATCH_BYTES_MAX, BATCH_HEADER_BYTES};
use super::failover::{self, Retry, LEADER_CHECK_INTERVAL};
use super::partitioner::{PartitionSelector, Partitioner};
use super::transport::{Pending, Transport};
use super::{Acks, Client, ClientError, ErrorCode, ProduceAck, Result, OFFSET_UNACKNOWLEDGED};

pub const BATCH_BYTES_DEFAULT: usize = 16 << 10;
pub const LINGER_DEFAULT: Duration = Duration::from_millis(5);
pub const IN_FLIGHT_BATCHES_MAX_DEFAULT: usize = 64;
/// Batches of one partition an idempotent producer keeps in flight at most: the batches per
/// producer and partition a broker remembers to recognise a retry (Kafka's five).
pub const IDEMPOTENT_IN_FLIGHT_MAX: usize = 5;

#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub topic: String,
    /// A batch is sent once it holds this many bytes (clamped to [`BATCH_BYTES_MAX`]).
    pub batch_bytes: usize,
    /// A batch is sent at the latest this long after its first record.
    pub linger: Duration,
    pub acks: Acks,
    pub partitioner: Partitioner,
    /// Batches sent but not yet acknowledged, across all partitions.
    pub max_in_flight_batches: usize,
    /// Batches of one partition sent but not yet acknowledged. While a partition is at this
    /// bound its open batch stays open and keeps filling, even past its linger, until one of
    /// its acknowledgements arrives (seen by the next `send` or `poll`) or it is full. At 1 a
    /// record waits at most about one round trip for company: few, well-filled requests under
    /// load with no fixed delay when idle. Like Kafka's `max.in.flight.requests.per.connection`,
    /// per partition; an idempotent producer keeps at most [`IDEMPOTENT_IN_FLIGHT_MAX`].
    pub max_in_flight_per_partition: usize,
    /// Stamp batches with a producer id and sequence numbers, so that a retry is stored once
    /// (see the module docs). Applies under `Acks::Durable` only, as Kafka's
    /// `enable.idempotence` needs acks=all.
    pub idempotent: bool,
}

impl ProducerConfig {
    pub fn new(topic: impl Into<String>) -> ProducerConfig {
        ProducerConfig {
            topic: topic.into(),
            batch_bytes: BATCH_BYTES_DEFAULT,
            linger: LINGER_DEFAULT,
            acks: Acks::Durable,
            partitioner: Partitioner::default(),
            max_in_flight_batches: IN_FLIGHT_BATCHES_MAX_DEFAULT,
            max_in_flight_per_partition: IN_FLIGHT_BATCHES_MAX_DEFAULT,
            idempotent: true,
        }
    }
}

/// The outcome of one batch.
#[derive(Debug)]
pub struct DeliveryReport {
    pub partition: u32,
    /// Offset of the batch's first record; [`OFFSET_UNACKNOWLEDGED`] under `Acks::None` or on
    /// failure.
    pub base_offset: i64,
    pub record_count: u32,
    /// When the batch's first and last records were handed to [`Producer::send`].
    pub first_enqueue: Instant,
    pub last_enqueue: Instant,
    /// When the outcome became known to the producer.
    pub completed: Instant,
    /// Times the batch was sent again because its partition's leader moved.
    pub retries: u32,
    /// `None` when the batch was appended (or sent, under `Acks::None`).
    pub error: Option<ClientError>,
}

/// Called once per batch, in send order, on the thread using the producer.
pub type DeliveryCallback = Box<dyn FnMut(DeliveryReport) + Send>;

#[derive(Debug)]
struct OpenBatch {
    builder: BatchBuilder,
    first_enqueue: Instant,
    last_enqueue: Instant,
}

/// What a report says about a batch besides its outcome.
#[derive(Debug, Clone, Copy)]
struct Batch {
    partition: u32,
    record_count: u32,
    first_enqueue: Instant,
    last_enqueue: Instant,
}

#[derive(Debug)]
struct InFlight<P> {
    batch: Batch,
    /// The batch's bytes, to be sent again if its partition's leader moves.
    records: Bytes,
    /// The request on its way; `None` once its outcome was taken, or while the batch waits
    /// for a new leader.
    pending: Option<P>,
    /// The outcome once seen (its partition's room is then free again), kept until every
    /// batch sent before it has been reported.
    outcome: Option<Result<ProduceAck>>,
    /// Its old leader did not take it: it is to be sent again (only during a fail-over).
    awaiting_leader: bool,
    /// Times it was sent again.
    retries: u32,
    /// Where it was last sent, if the transport follows leaders.
    sent_to: Option<SocketAddr>,
    /// The producer id it is stamped with, if any.
    producer_id: Option<i64>,
}

pub struct Producer<T: Transport = Client> {
    client: T,
    config: ProducerConfig,
    partitions: u32,
    selector: PartitionSelector,
    /// Indexed by partition.
    open: Vec<Option<OpenBatch>>,
    in_flight: VecDeque<InFlight<T::PendingProduce>>,
    /// Batches of `in_flight` per partition whose outcome has not been seen yet.
    in_flight_of: Vec<usize>,
    /// A batch is past its linger but its partition is at `max_in_flight_per_partition`: it
    /// goes once an outcome frees room (not by the linger deadline, which has passed).
    held: bool,
    /// The earliest time an open batch's linger expires.
    linger_deadline: Option<Instant>,
    wall_clock: WallClock,
    on_delivery: DeliveryCallback,
    failed_batches: u64,
    first_failure: Option<String>,
    /// Per partition: the retries since its leader moved, until a batch is acknowledged.
    retry: Vec<Option<Retry>>,
    /// Batches sent again after a leader change, since the producer was made.
    leader_retries: u64,
    /// Per partition: a leader found replaced while a batch waited for its answer (see
    /// [`wait_watching`]), until a batch of the partition is acknowledged.
    replaced: Vec<Option<SocketAddr>>,
    /// An idempotent producer's identity, and per partition the next batch's sequence.
    identity: Option<Identity>,
}

#[derive(Debug)]
struct Identity {
    producer_id: i64,
    epoch: i16,
    sequences: Vec<i32>,
    /// Per partition: a batch stamped with this id was acknowledged, so every leader the
    /// partition may have from now on knows the producer (see `has_room`).
    acknowledged: Vec<bool>,
    /// A batch failed for good: the next one takes a new producer id.
    renew: bool,
}

impl Identity {
    fn new((producer_id, epoch): (i64, i16), partitions: u32) -> Identity {
        let partitions = partitions as usize;
        Identity {
            producer_id,
            epoch,
            sequences: vec![0; partitions],
            acknowledged: vec![false; partitions],
            renew: false,
        }
    }
}

impl<T: Transport> std::fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("topic", &self.config.topic)
            .field("partitions", &self.partitions)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Producer<T> {
    /// `on_delivery` receives one report per batch; see the module docs.
    pub fn new(
        client: T,
        mut config: ProducerConfig,
        on_delivery: impl FnMut(DeliveryReport) + Send + 'static,
    ) -> Result<Producer<T>> {
        assert!(config.max_in_flight_batches > 0, "max_in_flight_batches must allow one batch");
        assert!(config.max_in_flight_per_partition > 0, "max_in_flight_per_partition must allow one batch");
        config.batch_bytes = config.batch_bytes.clamp(BATCH_HEADER_BYTES + 1, BATCH_BYTES_MAX);
        let partitions = client.partition_count(&config.topic)?;
        let identity = match config.idempotent && config.acks == Acks::Durable {
            true => client.init_producer_id()?.map(|id| Identity::new(id, partitions)),
            false => None,
        };
        if identity.is_some() {
            config.max_in_flight_per_partition =
                config.max_in_flight_per_partition.min(IDEMPOTENT_IN_FLIGHT_MAX);
        }
        if partitions == 0 {
            return Err(ClientError::UnknownPartition { topic: config.topic, partition: 0, partitions });
        }
        // Distinct seeds keep the sticky partitions of concurrent producers apart.
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Ok(Producer {
            client,
            selector: PartitionSelector::new(config.partitioner, seed ^ u64::from(std::process::id())),
            open: (0..partitions).map(|_| None).collect(),
            in_flight_of: vec![0; partitions as usize],
            held: false,
            in_flight: VecDeque::with_capacity(config.max_in_flight_batches),
            linger_deadline: None,
            wall_clock: WallClock::new(),
            on_delivery: Box::new(on_delivery),
            failed_batches: 0,
            first_failure: None,
            retry: vec![None; partitions as usize],
            leader_retries: 0,
            replaced: vec![None; partitions as usize],
            identity,
            partitions,
            config,
        })
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions
    }

    /// When the oldest open batch must be sent; call [`Producer::poll`] by then.
    pub fn linger_deadline(&self) -> Option<Instant> {
        self.linger_deadline
    }

    /// Appends a record to its partition's batch, sending batches that are full or lingered
    /// long enough. Returns the record's partition.
    ///
    /// An error means this record was *not* accepted: it is too large for any batch, or an
    /// earlier batch could not be sent (the broker is gone). Batches that fail, including one
    /// this record completed, are reported to the callback, never only here.
    pub fn send(&mut self, key: Option<&[u8]>, value: &[u8]) -> Result<u32> {
        let now = Instant::now();
        self.poll_at(now)?;
        let partition = self.selector.choose(key, self.partitions);
        let timestamp_ms = self.wall_clock.unix_ms(now);
        let index = partition as usize;
        let record_bytes = match &self.open[index] {
            Some(open) => open.builder.record_size_bytes(timestamp_ms, key, value),
            None => BatchBuilder::new(timestamp_ms, 0).record_size_bytes(timestamp_ms, key, value),
        };
        if BATCH_HEADER_BYTES + record_bytes > BATCH_BYTES_MAX {
            return Err(ClientError::RecordTooLarge { bytes: record_bytes, max: BATCH_BYTES_MAX });
        }
        let full = self.open[index]
            .as_ref()
            .is_some_and(|open| open.builder.size_bytes() + record_bytes > self.config.batch_bytes);
        if full {
            self.send_batch(partition)?;
        }
        let open = self.open[index].get_or_insert_with(|| OpenBatch {
            builder: BatchBuilder::new(
                timestamp_ms,
                self.config.batch_bytes.min(BATCH_HEADER_BYTES + record_bytes * 2),
            ),
            first_enqueue: now,
            last_enqueue: now,
        });
        open.builder.append(timestamp_ms, key, value);
        open.last_enqueue = now;
        let first_enqueue = open.first_enqueue;
        let reached_size = open.builder.size_bytes() >= self.config.batch_bytes;
        let deadline = first_enqueue + self.config.linger;
        if reached_size || (deadline <= now && self.has_room(partition)) {
            // The record is accepted either way: if its batch cannot be sent, the callback
            // reports the failure, and the caller learns of it there.
            let _ = self.send_batch(partition);
        } else if deadline <= now {
            self.held = true;
        } else {
            self.linger_deadline = Some(self.linger_deadline.map_or(deadline, |d| d.min(deadline)));
        }
        Ok(partition)
    }

    /// Collects finished acknowledgements and sends batches whose linger expired.
    pub fn poll(&mut self) -> Result<()> {
        self.poll_at(Instant::now())
    }

    fn poll_at(&mut self, now: Instant) -> Result<()> {
        let freed = self.collect_ready(now);
        let lingered = self.linger_deadline.is_some_and(|deadline| deadline <= now);
        let room_for_held = freed && self.held;
        if !(lingered || room_for_held) {
            return Ok(());
        }
        self.linger_deadline = None;
        self.held = false;
        // Every partition is looked at, even after a failed send, so none loses its deadline.
        let mut failure = None;
        for partition in 0..self.partitions {
            let Some(open) = &self.open[partition as usize] else { continue };
            let deadline = open.first_enqueue + self.config.linger;
            if deadline > now {
                self.linger_deadline = Some(self.linger_deadline.map_or(deadline, |d| d.min(deadline)));
            } else if self.has_room(partition) {
                if let Err(error) = self.send_batch(partition) {
                    failure.get_or_insert(error);
                }
            } else {
                self.held = true;
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Sends every open batch and waits for every acknowledgement (each wait bounded by the
    /// request timeout). Fails if any batch failed since the previous flush.
    pub fn flush(&mut self) -> Result<()> {
        let mut disconnect = None;
        for partition in 0..self.partitions {
            if self.open[partition as usize].is_some() {
                if let Err(error) = self.send_batch(partition) {
                    disconnect.get_or_insert(error);
                }
            }
        }
        self.linger_deadline = None;
        while !self.in_flight.is_empty() {
            self.report_oldest();
        }
        let failed_batches = std::mem::take(&mut self.failed_batches);
        let first = self.first_failure.take();
        if let Some(error) = disconnect {
            return Err(error);
        }
        match first {
            Some(first) => Err(ClientError::DeliveryFailed { failed_batches, first }),
            None => Ok(()),
        }
    }

    /// Batches sent and not yet reported.
    pub fn in_flight_batches(&self) -> usize {
        self.in_flight.len()
    }

    /// Batches sent again because their partition's leader moved, since the producer was made.
    pub fn leader_retries(&self) -> u64 {
        self.leader_retries
    }

    /// Whether a batch of `partition` may be sent without waiting for an acknowledgement.
    ///
    /// An idempotent producer sends a partition's first batch under its id alone: a leader
    /// that has never seen the producer takes its batch at any sequence, so if that first
    /// batch were refused (say by a node not yet leading) and the next ones taken, it could
    /// never follow them. Once one is acknowledged, every later leader holds it (it is
    /// committed) and refuses a batch that skips one, which is then sent again in turn.
    fn has_room(&self, partition: u32) -> bool {
        let per_partition = match &self.identity {
            Some(identity) if !identity.acknowledged[partition as usize] => 1,
            _ => self.config.max_in_flight_per_partition,
        };
        self.in_flight.len() < self.config.max_in_flight_batches
            && self.in_flight_of[partition as usize] < per_partition
    }

    /// Sends the open batch of `partition`, first waiting (oldest first, so reports stay in
    /// send order) for as many acknowledgements as the in-flight bounds need. A batch its
    /// partition's leader cannot take now waits for the next one ([`Producer::fail_over`]).
    fn send_batch(&mut self, partition: u32) -> Result<()> {
        let open = self.open[partition as usize].take().expect("caller checked the batch is open");
        self.selector.batch_sent(partition, self.partitions);
        while !self.has_room(partition) {
            self.report_oldest();
        }
        let batch = Batch {
            partition,
            record_count: open.builder.record_count(),
            first_enqueue: open.first_enqueue,
            last_enqueue: open.last_enqueue,
        };
        let records = match self.stamp(partition, open.builder) {
            Ok(records) => records,
            Err(error) => {
                self.report(batch, 0, Err(error.clone()));
                return Err(error);
            }
        };
        // Metadata read again for another partition may have moved this one: its batches
        // still on their way to the old leader are settled first, or this one could land
        // before those the old leader refuses.
        if self.sent_elsewhere(partition, self.client.leader_addr(&self.config.topic, partition)) {
            if let Some(moved) = self.settle_partition(partition) {
                // An error that ends the fail-over reaches the caller through the reports.
                let _ = self.fail_over(partition, moved);
            }
        }
        let sent_to = self.client.leader_addr(&self.config.topic, partition);
        let sent =
            self.client.produce_async(&self.config.topic, partition, records.clone(), self.config.acks);
        let (pending, awaiting_leader, moved) = match sent {
            Ok(pending) => (Some(pending), false, None),
            Err(error) if self.client.leader_moved(&self.config.topic, partition, &error) => {
                (None, true, Some(error))
            }
            Err(error) => {
                // The callback learns of the lost batch; the caller gets the cause too, so it
                // can tell a gone broker (`is_disconnect`) from a refused batch.
                self.report(batch, 0, Err(error.clone()));
                return Err(error);
            }
        };
        self.in_flight.push_back(InFlight {
            batch,
            records,
            pending,
            outcome: None,
            awaiting_leader,
            retries: 0,
            sent_to,
            producer_id: self.identity.as_ref().map(|identity| identity.producer_id),
        });
        self.in_flight_of[partition as usize] += 1;
        match moved.and_then(|error| self.fail_over(partition, error)) {
            // The batch is reported failed in its turn; the caller learns now that the
            // partition has no leader.
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Finishes a batch of `partition`, stamped with the producer's identity and the
    /// partition's next sequence if it is idempotent (taking a new id first if a batch failed
    /// for good since the last one).
    fn stamp(&mut self, partition: u32, builder: BatchBuilder) -> Result<Bytes> {
        let Some(identity) = &mut self.identity else { return Ok(builder.finish()) };
        if identity.renew {
            let (producer_id, epoch) =
                self.client.init_producer_id()?.ok_or_else(|| ClientError::UnexpectedResponse {
                    op: "init_producer_id",
                    got: "no producer id from a node that gave one before".to_owned(),
                })?;
            *identity = Identity::new((producer_id, epoch), self.partitions);
        }
        let sequence = &mut identity.sequences[partition as usize];
        let base_sequence = *sequence;
        // Kafka's sequences wrap from i32::MAX to 0.
        *sequence = ((i64::from(base_sequence) + i64::from(builder.record_count())) % (1 << 31)) as i32;
        let producer =
            IdempotentProducer { producer_id: identity.producer_id, epoch: identity.epoch, base_sequence };
        Ok(builder.idempotent(producer).finish())
    }

    /// Notes the outcomes that have arrived, freeing their partitions' room, and reports
    /// those at the front, in send order, without blocking. Looks past the front only while
    /// a batch is held at its partition's bound, whose room may be freed by a later batch.
    /// Returns whether any room was freed.
    fn collect_ready(&mut self, now: Instant) -> bool {
        let mut freed = false;
        if self.held {
            for index in 0..self.in_flight.len() {
                freed |= self.note_outcome(index, now, false);
            }
        }
        loop {
            if !self.held {
                freed |= self.note_outcome(0, now, false);
            }
            if self.in_flight.front().is_none_or(|front| front.outcome.is_none()) {
                return freed;
            }
            self.report_oldest();
        }
    }

    /// Takes the outcome of the `index`th batch in flight if it has arrived (waiting for it if
    /// `block`), freeing its partition's room; true if room was freed. An outcome saying the
    /// partition's leader moved starts a fail-over instead, which sends the batch again.
    fn note_outcome(&mut self, index: usize, now: Instant, block: bool) -> bool {
        let Some(in_flight) = self.in_flight.get_mut(index) else { return false };
        if in_flight.outcome.is_some() {
            return false;
        }
        assert!(!in_flight.awaiting_leader, "a fail-over sends or fails every batch it held back");
        let outcome = if block {
            let pending = in_flight.pending.take().expect("a batch in flight has its request");
            let partition = in_flight.batch.partition;
            let replaced = &mut self.replaced[partition as usize];
            wait_watching(&self.client, &self.config.topic, partition, in_flight.sent_to, replaced, pending)
        } else {
            let pending = in_flight.pending.as_mut().expect("a batch in flight has its request");
            let Some(outcome) = pending.try_wait(now) else { return false };
            in_flight.pending = None;
            outcome
        };
        let partition = in_flight.batch.partition;
        match outcome {
            Err(error) if self.must_resend(index, &error) => {
                self.in_flight[index].awaiting_leader = true;
                let before = self.in_flight_of[partition as usize];
                // An error that ends the fail-over reaches the caller through the reports.
                let _ = self.fail_over(partition, error);
                self.in_flight_of[partition as usize] < before
            }
            outcome => {
                self.settle(index, outcome);
                true
            }
        }
    }

    /// Whether the `index`th batch in flight, refused with `error`, is to be sent again: its
    /// partition's leader moved, or it is out of sequence while a batch of its partition
    /// sent before it is still on its way or waits for a leader (the leader that refused it
    /// has not seen that one yet; sent again after it, it may fit).
    fn must_resend(&self, index: usize, error: &ClientError) -> bool {
        let partition = self.in_flight[index].batch.partition;
        if self.client.leader_moved(&self.config.topic, partition, error) {
            return true;
        }
        matches!(error, ClientError::Server { code: ErrorCode::OutOfOrderSequence, .. })
            && self.in_flight.iter().take(index).any(|earlier| {
                earlier.batch.partition == partition && (earlier.awaiting_leader || earlier.outcome.is_none())
            })
    }

    /// Takes the final outcome of the `index`th batch in flight, freeing its partition's room.
    fn settle(&mut self, index: usize, outcome: Result<ProduceAck>) {
        let in_flight = &mut self.in_flight[index];
        let partition = in_flight.batch.partition as usize;
        if outcome.is_ok() {
            self.retry[partition] = None;
            self.replaced[partition] = None;
            if let Some(identity) = &mut self.identity {
                if in_flight.producer_id == Some(identity.producer_id) {
                    identity.acknowledged[partition] = true;
                }
            }
        }
        in_flight.outcome = Some(outcome);
        self.in_flight_of[partition] -= 1;
    }

    /// The leader of `partition` moved (`last` says how). Settles every other batch of the
    /// partition in flight (they went to the same old leader), then pauses, reads the metadata
    /// again and sends again, in send order, every batch the old leader did not take; until
    /// they are sent, or the retry budget is spent: they then fail, and the error is returned.
    fn fail_over(&mut self, partition: u32, mut last: ClientError) -> Option<ClientError> {
        let topic = self.config.topic.clone();
        let budget = self.client.leader_retry_budget();
        let mut retry = self.retry[partition as usize].unwrap_or_else(|| Retry::new(Instant::now(), budget));
        if let Some(moved) = self.settle_partition(partition) {
            last = moved;
        }
        loop {
            let Some(pause) = retry.next_pause(Instant::now()) else {
                let error =
                    retry.exhausted(&topic, partition, self.client.leader_name(&topic, partition), last);
                self.fail_awaiting(partition, &error);
                self.retry[partition as usize] = None;
                return Some(error);
            };
            std::thread::sleep(pause);
            // A failed read keeps what was known; the send below says whether a leader is back.
            let _ = self.client.refresh_leaders(&topic);
            match self.send_awaiting(partition) {
                Ok(()) => {
                    self.retry[partition as usize] = Some(retry);
                    return None;
                }
                Err(error) => last = error,
            }
        }
    }

    /// Whether a batch of `partition` still on its way went elsewhere than to `leader`.
    fn sent_elsewhere(&self, partition: u32, leader: Option<SocketAddr>) -> bool {
        self.in_flight.iter().any(|in_flight| {
            in_flight.batch.partition == partition
                && in_flight.outcome.is_none()
                && in_flight.sent_to != leader
        })
    }

    /// Waits for the outcome of every batch of `partition` still on its way; those whose
    /// leader moved wait for the next one. Returns the last such error, if any.
    fn settle_partition(&mut self, partition: u32) -> Option<ClientError> {
        let mut last = None;
        for index in 0..self.in_flight.len() {
            let in_flight = &mut self.in_flight[index];
            if in_flight.batch.partition != partition
                || in_flight.outcome.is_some()
                || in_flight.awaiting_leader
            {
                continue;
            }
            let pending = in_flight.pending.take().expect("a batch in flight has its request");
            let replaced = &mut self.replaced[partition as usize];
            match wait_watching(
                &self.client,
                &self.config.topic,
                partition,
                in_flight.sent_to,
                replaced,
                pending,
            ) {
                Err(error) if self.must_resend(index, &error) => {
                    self.in_flight[index].awaiting_leader = true;
                    last = Some(error);
                }
                outcome => self.settle(index, outcome),
            }
        }
        last
    }

    /// Sends again, in send order, the batches of `partition` that wait for a leader. Stops
    /// at the first that its leader cannot take either (the later ones must not overtake it).
    fn send_awaiting(&mut self, partition: u32) -> Result<()> {
        for in_flight in &mut self.in_flight {
            if in_flight.batch.partition != partition || !in_flight.awaiting_leader {
                continue;
            }
            let records = in_flight.records.clone();
            let sent_to = self.client.leader_addr(&self.config.topic, partition);
            match self.client.produce_async(&self.config.topic, partition, records, self.config.acks) {
                Ok(pending) => {
                    in_flight.pending = Some(pending);
                    in_flight.sent_to = sent_to;
                    in_flight.awaiting_leader = false;
                    in_flight.retries += 1;
                    self.leader_retries += 1;
                }
                Err(error) if self.client.leader_moved(&self.config.topic, partition, &error) => {
                    return Err(error);
                }
                Err(error) => {
                    in_flight.awaiting_leader = false;
                    in_flight.outcome = Some(Err(error));
                    self.in_flight_of[partition as usize] -= 1;
                }
            }
        }
        Ok(())
    }

    /// Fails every batch of `partition` that waits for a leader with `error`.
    fn fail_awaiting(&mut self, partition: u32, error: &ClientError) {
        for in_flight in &mut self.in_flight {
            if in_flight.batch.partition == partition && in_flight.awaiting_leader {
                in_flight.awaiting_leader = false;
                in_flight.outcome = Some(Err(error.clone()));
                self.in_flight_of[partition as usize] -= 1;
            }
        }
    }

    /// Reports the oldest batch in flight, waiting for its outcome if it has not arrived.
    fn report_oldest(&mut self) {
        while self.in_flight.front().expect("a batch is in flight").outcome.is_none() {
            self.note_outcome(0, Instant::now(), true);
        }
        let oldest = self.in_flight.pop_front().expect("looked at above");
        let outcome = oldest.outcome.expect("the loop above took it");
        self.report(oldest.batch, oldest.retries, outcome);
    }

    fn report(&mut self, batch: Batch, retries: u32, outcome: Result<ProduceAck>) {
        let Batch { partition, record_count, first_enqueue, last_enqueue } = batch;
        // An acknowledgement counts from when it arrived, not from when this producer looked.
        let mut completed = Instant::now();
        let (base_offset, error) = match outcome {
            Ok(ack) => {
                completed = ack.acknowledged_at.unwrap_or(completed);
                (ack.base_offset, None)
            }
            Err(error) => {
                if let Some(identity) = &mut self.identity {
                    identity.renew = true;
                }
                self.failed_batches += 1;
                self.first_failure.get_or_insert_with(|| format!("partition {partition}: {error}"));
                (OFFSET_UNACKNOWLEDGED, Some(error))
            }
        };
        (self.on_delivery)(DeliveryReport {
            partition,
            base_offset,
            record_count,
            first_enqueue,
            last_enqueue,
            completed,
            retries,
            error,
        });
    }
}

impl<T: Transport> Drop for Producer<T> {
    /// Sends what is buffered and waits for it; the outcomes still reach the callback.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Waits for the outcome of a batch of `partition` sent to `sent_to` (its leader then, if the
/// transport follows leaders). A leader that leaves it unanswered for [`LEADER_CHECK_INTERVAL`]
/// is looked into: if the metadata has moved the partition elsewhere since, or the other
/// nodes name a leader of a later epoch (this one was paused or cut off, and replaced), the
/// batch is given up with [`ClientError::LeaderReplaced`], which the fail-over sends on to the
/// new leader; else it waits on, until the request timeout. The leader found replaced is kept
/// in `replaced`, so the partition's later batches sent there are given up without waiting
/// again (those answered meanwhile keep their answer).
fn wait_watching<T: Transport>(
    client: &T,
    topic: &str,
    partition: u32,
    sent_to: Option<SocketAddr>,
    replaced: &mut Option<SocketAddr>,
    mut pending: T::PendingProduce,
) -> Result<ProduceAck> {
    let started = Instant::now();
    loop {
        if sent_to.is_some() && *replaced == sent_to {
            if let Some(outcome) = pending.try_wait(Instant::now()) {
                return outcome;
            }
            pending.abandon();
            return Err(ClientError::LeaderReplaced {
                topic: topic.to_owned(),
                partition,
                waited: started.elapsed(),
                leader: client.leader_name(topic, partition),
            });
        }
        if let Some(outcome) = pending.wait_within(LEADER_CHECK_INTERVAL) {
            return outcome;
        }
        if failover::leader_left(client, topic, partition, sent_to) {
            *replaced = sent_to;
        }
    }
}

/// Record timestamps (Unix ms) derived from the monotonic reading `send` takes anyway: the
/// wall clock itself is read once a second rather than once a record.
#[derive(Debug)]
struct WallClock {
    anchor: Instant,
    anchor_unix_ms: i64,
}

impl WallClock {
    const REREAD: Duration = Duration::from_secs(1);

    fn new() -> WallClock {
        WallClock { anchor: Instant::now(), anchor_unix_ms: unix_ms() }
    }

    fn unix_ms(&mut self, now: Instant) -> i64 {
        let since = now.saturating_duration_since(self.anchor);
        if since >= WallClock::REREAD {
            *self = WallClock { anchor: now, anchor_unix_ms: unix_ms() };
            return self.anchor_unix_ms;
        }
        self.anchor_unix_ms + i64::try_from(since.as_millis()).expect("under a second")
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
