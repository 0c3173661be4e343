//! A consumer of a fixed set of partitions of one topic, with no group membership.
//!
//! Each partition has at most one fetch in flight, on its owning shard's connection. A poll
//! sends a fetch for every partition that has none, then takes whichever answers have arrived,
//! sleeping (on a [`Doorbell`] every fetch rings when it completes) only while none has, so a
//! partition long-polling at its end never holds back another's data. As soon as an answer is
//! taken, the fetch for what follows it is sent (prefetch), before its records are read, so
//! the broker and this thread work at the same time. A fetch returns whole
//! batches, so the first batch may start before the requested offset: records below a
//! partition's next offset are skipped, which keeps delivery exactly-once and in order per
//! partition within this consumer.
//!
//! Leader changes ([`super::failover`]): a fetch that fails because its partition's leader
//! moved (over a transport that follows leaders) is sent again from the same next offset,
//! after a backoff and a fresh read of the metadata, to the new leader; the other partitions
//! go on meanwhile. Records already handed out are not handed out again: the position is the
//! consumer's, not the node's. Past the retry budget the poll fails with `LeaderUnavailable`.
//! A fetch its leader leaves unanswered past its own long-poll wait plus
//! [`LEADER_CHECK_INTERVAL`] is looked into as a producer's batch is (a paused or cut-off
//! leader resets no connection): if the metadata has moved the partition, or another node
//! names a leader of a later epoch, it is given up and sent to the new leader; else it waits
//! on, looked into again each interval, until the request timeout.
//!
//! Invariants: a partition's next offset only grows; it moves past a record only once that
//! record has been handed out; a prefetch whose offset is not the next offset (the records it
//! follows were cut short) is dropped and asked again. Records are zero-copy slices of the
//! fetch response.
//!
//! The transport is the native [`Client`] by default, or a [`super::KafkaClient`]: the
//! prefetching and the offset bookkeeping are this module's, whatever the protocol underneath.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::batch::{self, BatchError};
use super::failover::{self, Retry, LEADER_CHECK_INTERVAL};
use super::pipeline::Doorbell;
use super::transport::{Pending, Transport};
use super::{Client, ClientError, FetchResult, Result, OFFSET_EARLIEST, OFFSET_LATEST};

/// Default bytes asked of each partition per fetch.
pub const FETCH_BYTES_MAX_DEFAULT: u32 = 1 << 20;
/// Longest a poll sleeps between looks at its fetches when none has completed: completions
/// wake it at once; this only bounds how late it notices a request timeout.
const DOORBELL_WAIT_MAX: Duration = Duration::from_millis(100);

/// Where a consumer starts reading each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Earliest,
    Latest,
    Offset(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub partition: u32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
}

#[derive(Debug)]
struct Position<P> {
    partition: u32,
    next_offset: i64,
    high_watermark: i64,
    /// The fetch in flight for this partition, if any.
    prefetch: Option<Prefetch<P>>,
    /// The retries since the partition's leader moved, until a fetch succeeds.
    retry: Option<Retry>,
    /// While its leader moves: when the next fetch may go.
    retry_at: Option<Instant>,
}

/// A fetch sent ahead, and the offset it asked for.
#[derive(Debug)]
struct Prefetch<P> {
    offset: i64,
    pending: P,
    /// Where it went (its leader then, if the transport follows leaders), and when.
    sent_to: Option<SocketAddr>,
    sent_at: Instant,
    /// When it is looked into if still unanswered: past its long-poll wait plus
    /// [`LEADER_CHECK_INTERVAL`], then each interval.
    look_at: Instant,
}

impl<P> Prefetch<P> {
    fn new<T: Transport>(
        client: &T,
        topic: &str,
        partition: u32,
        offset: i64,
        pending: P,
        max_wait_ms: u32,
    ) -> Self {
        let sent_at = Instant::now();
        Prefetch {
            offset,
            pending,
            sent_to: client.leader_addr(topic, partition),
            sent_at,
            look_at: sent_at + Duration::from_millis(u64::from(max_wait_ms)) + LEADER_CHECK_INTERVAL,
        }
    }

    /// Whether the fetch, unanswered at its look, went to a leader replaced since: the metadata
    /// moved the partition, or another node names a leader of a later epoch. If not, the next
    /// look is an interval later.
    fn leader_replaced<T: Transport>(&mut self, client: &T, topic: &str, partition: u32) -> bool {
        self.look_at = Instant::now() + LEADER_CHECK_INTERVAL;
        failover::leader_left(client, topic, partition, self.sent_to)
    }
}

#[derive(Debug)]
pub struct Consumer<T: Transport = Client> {
    client: T,
    topic: String,
    positions: Vec<Position<T::PendingFetch>>,
    fetch_bytes_max: u32,
    /// Rung by every fetch in flight when it completes.
    doorbell: Arc<Doorbell>,
    /// A fetch that failed in a poll that also handed out records (which `poll` returns),
    /// reported by the next poll.
    deferred_failure: Option<ClientError>,
    /// A partition's leader moved: read the metadata before the next fetch that retries.
    refresh_due: bool,
    /// Fetches sent again after a leader change.
    leader_retries: u64,
}

impl<T: Transport> Consumer<T> {
    /// Resolves each partition's start offset with the broker.
    pub fn new(client: T, topic: &str, partitions: &[u32], start: StartAt) -> Result<Consumer<T>> {
        let mut positions = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            let next_offset = match start {
                StartAt::Earliest => client.list_offsets(topic, partition, OFFSET_EARLIEST)?,
                StartAt::Latest => client.list_offsets(topic, partition, OFFSET_LATEST)?,
                StartAt::Offset(offset) => offset,
            };
            positions.push(Position {
                partition,
                next_offset,
                high_watermark: next_offset,
                prefetch: None,
                retry: None,
                retry_at: None,
            });
        }
        Ok(Consumer {
            client,
            topic: topic.to_owned(),
            positions,
            fetch_bytes_max: FETCH_BYTES_MAX_DEFAULT,
            doorbell: Arc::default(),
            deferred_failure: None,
            refresh_due: false,
            leader_retries: 0,
        })
    }

    /// Bytes asked of each partition per fetch. A batch larger than this cannot be read.
    pub fn set_fetch_bytes_max(&mut self, bytes: u32) {
        assert!(bytes > 0);
        self.fetch_bytes_max = bytes;
    }

    /// The next offset to read from `partition`, if this consumer reads it.
    pub fn position(&self, partition: u32) -> Option<i64> {
        self.positions.iter().find(|p| p.partition == partition).map(|p| p.next_offset)
    }

    /// Fetches sent again because their partition's leader moved, since the consumer was made.
    pub fn leader_retries(&self) -> u64 {
        self.leader_retries
    }

    /// Records not yet consumed below the last seen high watermarks (the consumer's lag).
    pub fn lag(&self) -> i64 {
        self.positions.iter().map(|p| (p.high_watermark - p.next_offset).max(0)).sum()
    }

    /// Fetches every partition once, waiting up to `max_wait` for data, and returns the new
    /// records in offset order per partition.
    pub fn poll(&mut self, max_wait: Duration) -> Result<Vec<ConsumedRecord>> {
        let mut records = Vec::new();
        self.poll_each(max_wait, |record| records.push(record))?;
        Ok(records)
    }

    /// Like [`Consumer::poll`], handing each record to `on_record` instead of collecting them.
    /// Returns how many records were handed out.
    pub fn poll_each(
        &mut self,
        max_wait: Duration,
        mut on_record: impl FnMut(ConsumedRecord),
    ) -> Result<usize> {
        if let Some(failure) = self.deferred_failure.take() {
            return Err(failure);
        }
        let max_wait_ms = u32::try_from(max_wait.as_millis()).unwrap_or(u32::MAX);
        let deadline = Instant::now() + max_wait;
        // Hand out what has arrived; when nothing has, wait for whichever fetch answers first,
        // so a partition long-polling at its end holds back none of the others.
        loop {
            self.send_fetches(max_wait_ms)?;
            let seen = self.doorbell.rings();
            if let Some(handed_out) = self.hand_out_arrived(max_wait_ms, &mut on_record)? {
                return Ok(handed_out);
            }
            let now = Instant::now();
            // With no fetch on its way (every partition waits for a moved leader), the poll
            // ends when its own wait does.
            let in_flight = self.positions.iter().any(|p| p.prefetch.is_some());
            if self.positions.is_empty() || (!in_flight && now >= deadline) {
                return Ok(0);
            }
            // Woken by a completion, or when a retry is due; the cap only bounds how late a
            // request timeout is noticed.
            let retry_due = self.positions.iter().filter_map(|p| p.retry_at).min();
            let sleep = retry_due.map_or(DOORBELL_WAIT_MAX, |at| at.saturating_duration_since(now));
            self.doorbell.wait_past(seen, sleep.min(DOORBELL_WAIT_MAX));
        }
    }

    /// Sends a fetch for every partition that has none (or one for an offset it no longer
    /// needs), except those waiting out a retry's pause after their leader moved.
    fn send_fetches(&mut self, max_wait_ms: u32) -> Result<()> {
        let now = Instant::now();
        if self.refresh_due && self.positions.iter().any(|p| p.retry_at.is_some_and(|at| at <= now)) {
            // A failed read keeps what was known; the fetch below says whether a leader is back.
            let _ = self.client.refresh_leaders(&self.topic);
            self.refresh_due = false;
        }
        for position in &mut self.positions {
            let stale = position.prefetch.as_ref().is_some_and(|p| p.offset != position.next_offset);
            let pausing = position.retry_at.is_some_and(|at| at > now);
            if !(position.prefetch.is_none() || stale) || pausing {
                continue;
            }
            let retrying = position.retry_at.take().is_some();
            let offset = position.next_offset;
            let partition = position.partition;
            match self.client.fetch_async(&self.topic, partition, offset, self.fetch_bytes_max, max_wait_ms) {
                Ok(pending) => {
                    pending.ring_on_completion(&self.doorbell);
                    position.prefetch = Some(Prefetch::new(
                        &self.client,
                        &self.topic,
                        partition,
                        offset,
                        pending,
                        max_wait_ms,
                    ));
                    self.leader_retries += u64::from(retrying);
                }
                Err(error) if self.client.leader_moved(&self.topic, partition, &error) => {
                    position.prefetch = None;
                    retry_later(&self.client, &self.topic, position, error, now)?;
                    self.refresh_due = true;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Takes every fetch that has answered (or failed, or timed out); `None` if none has.
    fn hand_out_arrived(
        &mut self,
        max_wait_ms: u32,
        on_record: &mut impl FnMut(ConsumedRecord),
    ) -> Result<Option<usize>> {
        let now = Instant::now();
        let mut handed_out = None;
        let mut failure = None;
        for position in &mut self.positions {
            let Some(prefetch) = position.prefetch.as_mut() else { continue };
            let fetched = match prefetch.pending.try_wait(now) {
                Some(fetched) => fetched,
                None if prefetch.look_at <= now
                    && prefetch.leader_replaced(&self.client, &self.topic, position.partition) =>
                {
                    let prefetch = position.prefetch.take().expect("looked at above");
                    prefetch.pending.abandon();
                    Err(ClientError::LeaderReplaced {
                        topic: self.topic.clone(),
                        partition: position.partition,
                        waited: now.saturating_duration_since(prefetch.sent_at),
                        leader: self.client.leader_name(&self.topic, position.partition),
                    })
                }
                None => continue,
            };
            position.prefetch = None;
            let fetched = match fetched {
                Err(error) if self.client.leader_moved(&self.topic, position.partition, &error) => {
                    self.refresh_due = true;
                    if let Err(exhausted) = retry_later(&self.client, &self.topic, position, error, now) {
                        failure.get_or_insert(exhausted);
                    }
                    continue;
                }
                fetched => fetched,
            };
            if fetched.is_ok() {
                position.retry = None;
            }
            let fetch = (self.fetch_bytes_max, max_wait_ms);
            let taken = fetched.and_then(|fetched| {
                take_fetched(&self.client, &self.topic, &self.doorbell, fetch, position, fetched, on_record)
            });
            match taken {
                Ok(records) => *handed_out.get_or_insert(0) += records,
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        match failure {
            // The records already handed out go back first; the failure comes next poll.
            Some(error) if handed_out.is_some_and(|records| records > 0) => {
                self.deferred_failure = Some(error);
                Ok(handed_out)
            }
            Some(error) => Err(error),
            None => Ok(handed_out),
        }
    }
}

/// Takes a partition's answered fetch: asks for what follows it first (so the broker works on
/// the next fetch while this thread reads), then hands out its records and advances.
fn take_fetched<T: Transport>(
    client: &T,
    topic: &str,
    doorbell: &Arc<Doorbell>,
    (fetch_bytes_max, max_wait_ms): (u32, u32),
    position: &mut Position<T::PendingFetch>,
    fetched: FetchResult,
    on_record: &mut impl FnMut(ConsumedRecord),
) -> Result<usize> {
    position.high_watermark = fetched.high_watermark;
    if let Some(end) = batch::end_offset(&fetched.records).filter(|end| *end > position.next_offset) {
        match client.fetch_async(topic, position.partition, end, fetch_bytes_max, max_wait_ms) {
            Ok(pending) => {
                pending.ring_on_completion(doorbell);
                position.prefetch =
                    Some(Prefetch::new(client, topic, position.partition, end, pending, max_wait_ms));
            }
            // The next poll's round sends it again, following the leader.
            Err(error) if client.leader_moved(topic, position.partition, &error) => {}
            Err(error) => return Err(error),
        }
    }
    let handed_out = read_records(topic, position, &fetched, on_record)?;
    // Every complete batch was read: step past batches without records (transaction
    // markers), or the same empty batch would be fetched forever.
    if let Some(end) = batch::end_offset(&fetched.records) {
        position.next_offset = position.next_offset.max(end);
    }
    Ok(handed_out)
}

/// Schedules the partition's next fetch after a pause, its leader having moved (`error`);
/// fails once the retry budget is spent.
fn retry_later<T: Transport>(
    client: &T,
    topic: &str,
    position: &mut Position<T::PendingFetch>,
    error: ClientError,
    now: Instant,
) -> Result<()> {
    let retry = position.retry.get_or_insert_with(|| Retry::new(now, client.leader_retry_budget()));
    match retry.next_pause(now) {
        Some(pause) => {
            position.retry_at = Some(now + pause);
            Ok(())
        }
        None => {
            let leader = client.leader_name(topic, position.partition);
            let exhausted = retry.exhausted(topic, position.partition, leader, error);
            position.retry = None;
            Err(exhausted)
        }
    }
}

/// Hands out the records of `fetched` at or after `position.next_offset`, advancing it.
fn read_records<P>(
    topic: &str,
    position: &mut Position<P>,
    fetched: &FetchResult,
    on_record: &mut impl FnMut(ConsumedRecord),
) -> Result<usize> {
    let partition = position.partition;
    let mut handed_out = 0;
    let mut batches_read = false;
    for record in fetched.reader() {
        let record = match record {
            Ok(record) => record,
            // The fetch was cut by max_bytes: the rest comes with the next fetch.
            Err(BatchError::Truncated { at, .. }) if at > 0 || batches_read => break,
            Err(error) => {
                return Err(ClientError::CorruptBatch { topic: topic.to_owned(), partition, error })
            }
        };
        batches_read = true;
        if record.offset < position.next_offset {
            continue;
        }
        position.next_offset = record.offset + 1;
        handed_out += 1;
        on_record(ConsumedRecord {
            partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            key: record.key,
            value: record.value,
        });
    }
    Ok(handed_out)
}
