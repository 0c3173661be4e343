//! One fetch for both protocols: which partitions are read, how many bytes each may return
//! and the whole response, how long it waits. The protocols only translate requests and
//! responses.
//!
//! - Partitions are read in request order, in waves read at once (a partition on another
//!   shard is read there): a wave takes partitions while what their reads may take (their
//!   limits, at least a disk read's window each) fits what is left of the request's
//!   `max_bytes` (at most `FETCH_RESPONSE_BYTES_MAX`), so a request reads little more than it
//!   returns, however many partitions it names. As in Kafka, only the response's first batch
//!   may be larger than its limit; the other partitions read nothing larger.
//! - Once the budget is spent, or a batch read did not fit what was left, the remaining
//!   partitions report their offsets with no records (the client asks again).
//! - A request names at most [`FETCH_PARTITIONS_MAX`] partitions; those past it report their
//!   offsets with no records and are not waited on.
//! - Long-poll: with less than `min_bytes` over all partitions and `max_wait` left, it waits
//!   for data past the end of any partition it read, then reads everything again.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::future::{join_all, select_all};
use pyralog_dma::READAHEAD_BYTES;
use pyralog_shard::{
    keep_within, FetchLimits, Fetched, Shard, ShardError, FETCH_PARTITION_BYTES_MAX,
    FETCH_RESPONSE_BYTES_MAX, FETCH_WAIT_MAX,
};

/// Partitions one fetch reads; the rest of a larger request report their offsets only. Far
/// above what a consumer asks one shard for, it bounds a request's work and the wakers its
/// long-poll registers.
pub const FETCH_PARTITIONS_MAX: usize = 4096;

/// One partition a fetch asks for.
pub struct Wanted<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub offset: i64,
    /// This partition's own bound; 0: only the request's.
    pub max_bytes: u32,
    /// The leader epoch the client knows (Kafka's current_leader_epoch); -1: none.
    pub current_leader_epoch: i32,
}

/// Reads `wanted` within `max_bytes` in all, waiting up to `max_wait` for `min_bytes`.
/// Results come in request order.
pub async fn fetch(
    shard: &Shard,
    wanted: &[Wanted<'_>],
    max_bytes: u32,
    min_bytes: u32,
    max_wait: Duration,
) -> Vec<Result<Fetched, ShardError>> {
    let deadline = Instant::now() + max_wait.min(FETCH_WAIT_MAX);
    loop {
        let results = read_once(shard, wanted, max_bytes).await;
        let bytes: usize = results.iter().map(|r| r.as_ref().map_or(0, Fetched::bytes)).sum();
        let left = deadline.saturating_duration_since(Instant::now());
        // As in Kafka, min_bytes 0 answers at once.
        let done = bytes >= min_bytes as usize || results.iter().any(Result::is_err);
        if done || left.is_zero() || wanted.is_empty() {
            return results;
        }
        // Wait for data past each partition's end, on all of them at once; the first to see
        // some (or the deadline) ends the wait, then everything is read again.
        let waits: Vec<Pin<Box<dyn Future<Output = _> + '_>>> = wanted
            .iter()
            .zip(&results)
            .take(FETCH_PARTITIONS_MAX)
            .map(|(w, result)| {
                let end = result.as_ref().map_or(w.offset, |f| f.high_watermark.max(w.offset));
                let limits = FetchLimits {
                    max_bytes: 1,
                    min_one_batch: true,
                    min_bytes: 1,
                    max_wait: left,
                    current_leader_epoch: w.current_leader_epoch,
                };
                Box::pin(shard.fetch(w.topic, w.partition, end, limits)) as Pin<Box<dyn Future<Output = _>>>
            })
            .collect();
        let _ = select_all(waits).await;
    }
}

/// Reads every partition once, without waiting, in waves within the budget.
async fn read_once(shard: &Shard, wanted: &[Wanted<'_>], max_bytes: u32) -> Vec<Result<Fetched, ShardError>> {
    let mut results: Vec<Result<Fetched, ShardError>> = Vec::with_capacity(wanted.len());
    let mut left = u64::from(max_bytes.clamp(1, FETCH_RESPONSE_BYTES_MAX));
    let mut kept_any = false;
    let mut next = 0;
    let readable = wanted.len().min(FETCH_PARTITIONS_MAX);
    while next < readable && left > 0 {
        // What a partition may read now, and what reading it may take: a disk read reads at
        // least a window.
        let limit_of = |w: &Wanted<'_>| {
            let own = if w.max_bytes == 0 { left } else { u64::from(w.max_bytes).min(left) };
            own.min(u64::from(FETCH_PARTITION_BYTES_MAX)) as u32
        };
        let cost_of = |w: &Wanted<'_>| u64::from(limit_of(w)).max(READAHEAD_BYTES as u64);
        // A wave: the partitions whose reads together fit what is left, at least one.
        let mut end = next + 1;
        let mut wave_cost = cost_of(&wanted[next]);
        while end < readable && wave_cost + cost_of(&wanted[end]) <= left {
            wave_cost += cost_of(&wanted[end]);
            end += 1;
        }
        // As in Kafka, only the response's first batch may be larger than what is left: the
        // wave's first partition may return one while nothing is kept; the others read only
        // what fits their limits.
        let reads = (next..end).map(|i| {
            let min_one = i == next && !kept_any;
            read(shard, &wanted[i], limit_of(&wanted[i]), min_one)
        });
        let mut wave = join_all(reads).await;
        let read_bytes: usize = wave.iter().map(|r| r.as_ref().map_or(0, Fetched::bytes)).sum();
        let kept = keep_within(wave.iter_mut().flatten(), left as usize, !kept_any);
        kept_any |= kept > 0;
        left = left.saturating_sub(kept as u64);
        if kept < read_bytes {
            // Something read did not fit: the response is as full as it gets.
            left = 0;
        }
        results.extend(wave);
        next = end;
    }
    // The rest, past the budget or the partition bound: their offsets only.
    results.extend(join_all(wanted[next..].iter().map(|w| read(shard, w, 0, false))).await);
    results
}

/// Reads one partition without waiting; `max_bytes` 0: its offsets only.
fn read<'a>(
    shard: &'a Shard,
    wanted: &Wanted<'a>,
    max_bytes: u32,
    min_one_batch: bool,
) -> impl Future<Output = Result<Fetched, ShardError>> + 'a {
    let limits = FetchLimits {
        max_bytes,
        min_one_batch,
        min_bytes: 0,
        max_wait: Duration::ZERO,
        current_leader_epoch: wanted.current_leader_epoch,
    };
    shard.fetch(wanted.topic, wanted.partition, wanted.offset, limits)
}
