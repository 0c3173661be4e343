//! A consumer of a fixed set of partitions of one topic, with no group membership.
//!
//! Each poll sends one fetch per partition at once (pipelined on the owning shards'
//! connections), then reads the answers in order. A fetch returns whole batches, so the first
//! batch may start before the requested offset: records below a partition's next offset are
//! skipped, which keeps delivery exactly-once and in order per partition within this consumer.
//!
//! Invariants: a partition's next offset only grows; it moves past a record only once that
//! record has been handed out. Records are zero-copy slices of the fetch response.

use std::time::Duration;

use bytes::Bytes;

use super::batch::BatchError;
use super::{Client, ClientError, PendingFetch, Result, OFFSET_EARLIEST, OFFSET_LATEST};

/// Default bytes asked of each partition per fetch.
pub const FETCH_BYTES_MAX_DEFAULT: u32 = 1 << 20;

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

#[derive(Debug, Clone, Copy)]
struct Position {
    partition: u32,
    next_offset: i64,
    high_watermark: i64,
}

#[derive(Debug)]
pub struct Consumer {
    client: Client,
    topic: String,
    positions: Vec<Position>,
    fetch_bytes_max: u32,
}

impl Consumer {
    /// Resolves each partition's start offset with the broker.
    pub fn new(client: Client, topic: &str, partitions: &[u32], start: StartAt) -> Result<Consumer> {
        let mut positions = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            let next_offset = match start {
                StartAt::Earliest => client.list_offsets(topic, partition, OFFSET_EARLIEST)?,
                StartAt::Latest => client.list_offsets(topic, partition, OFFSET_LATEST)?,
                StartAt::Offset(offset) => offset,
            };
            positions.push(Position { partition, next_offset, high_watermark: next_offset });
        }
        Ok(Consumer { client, topic: topic.to_owned(), positions, fetch_bytes_max: FETCH_BYTES_MAX_DEFAULT })
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
        let max_wait_ms = u32::try_from(max_wait.as_millis()).unwrap_or(u32::MAX);
        let pending: Vec<PendingFetch> = self
            .positions
            .iter()
            .map(|p| {
                let fetch = &self.client;
                fetch.fetch_async(&self.topic, p.partition, p.next_offset, self.fetch_bytes_max, max_wait_ms)
            })
            .collect::<Result<_>>()?;
        let mut handed_out = 0;
        for (position, pending) in self.positions.iter_mut().zip(pending) {
            let fetched = pending.wait()?;
            position.high_watermark = fetched.high_watermark;
            let partition = position.partition;
            let corrupt = |source| ClientError::CorruptBatch { topic: self.topic.clone(), partition, source };
            let mut batches_read = false;
            for record in fetched.reader() {
                let record = match record {
                    Ok(record) => record,
                    // The fetch was cut by max_bytes: the rest comes with the next fetch.
                    Err(BatchError::Truncated { at, .. }) if at > 0 || batches_read => break,
                    Err(error) => return Err(corrupt(error)),
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
        }
        Ok(handed_out)
    }
}
