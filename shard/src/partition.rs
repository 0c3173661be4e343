//! A partition as its shard sees it: the log, the events that move produce and fetch along,
//! and the flusher task that does group commit.
//!
//! Group commit. Produce appends (offsets are assigned at once) and wakes the flusher; the
//! flusher flushes everything pending in one write and one fdatasync, then wakes the waiters.
//! While a flush is in flight new appends pile up and go in the next one, so under load each
//! fdatasync covers many requests. In cached mode the flusher waits for `flush_interval` or
//! `flush_bytes` instead, and produce does not wait at all.
//!
//! High watermark: what a consumer may read. In sync mode it is the durable offset, so a
//! consumer never sees a record a crash could take back; in cached mode it is the log end.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use pyralog_dma::Log;

use crate::cache::PartitionKey;
use crate::event::Event;
use crate::metrics::ShardMetrics;
use crate::producers::ProducerStates;

/// What an acknowledged produce promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after the batch is written and fdatasync'ed.
    Sync,
    /// Acknowledge once the batch is in memory; flush every `flush_interval` or once
    /// `flush_bytes` are waiting. A crash loses what was not flushed yet.
    Cached { flush_interval: Duration, flush_bytes: u64 },
}

pub(crate) struct Partition {
    pub topic: String,
    pub partition: u32,
    pub key: PartitionKey,
    pub log: Log,
    pub durability: Durability,
    /// A flush finished (or failed).
    pub flushed: Event,
    /// The high watermark moved.
    pub data_arrived: Event,
    /// Work for the flusher: an append, or a close.
    pub flusher_wake: Event,
    pub closing: Cell<bool>,
    pub flusher_done: Event,
    pub flusher_running: Cell<bool>,
    /// Idempotent producers' recent sequences.
    pub producers: RefCell<ProducerStates>,
    /// One produce at a time from arrival to append, first come first served: requests
    /// pipelined on a connection are appended in the order they were sent, even when some
    /// wait for a flush (an idempotent producer's sequences depend on it).
    pub append_turn: glommio::sync::Semaphore,
    /// A replicated partition's commit point (set by its replica): what consumers may read.
    pub commit: Cell<Option<i64>>,
    /// Set while a replica truncates the log: the flusher starts no flush.
    pub flush_hold: Cell<bool>,
}

impl Partition {
    pub fn new(
        topic: &str,
        partition: u32,
        key: PartitionKey,
        log: Log,
        durability: Durability,
    ) -> Partition {
        Partition {
            topic: topic.to_owned(),
            partition,
            key,
            log,
            durability,
            flushed: Event::default(),
            data_arrived: Event::default(),
            flusher_wake: Event::default(),
            closing: Cell::new(false),
            flusher_done: Event::default(),
            flusher_running: Cell::new(false),
            producers: RefCell::new(ProducerStates::default()),
            append_turn: glommio::sync::Semaphore::new(1),
            commit: Cell::new(None),
            flush_hold: Cell::new(false),
        }
    }

    /// What consumers may read up to: the durable offset in sync mode; in cached mode
    /// everything appended, until a failed flush stops the log and what was not yet on disk
    /// is gone (the cache drops it too).
    pub fn high_watermark(&self) -> i64 {
        if let Some(commit) = self.commit.get() {
            return commit.min(self.log.next_offset());
        }
        match self.durability {
            Durability::Cached { .. } if self.log.stopped().is_none() => self.log.next_offset(),
            _ => self.log.durable_offset(),
        }
    }

    /// Waits until everything below `offset` is durable, or the log stopped.
    pub async fn wait_durable(&self, offset: i64) -> Result<(), pyralog_dma::LogError> {
        loop {
            if self.log.durable_offset() >= offset {
                return Ok(());
            }
            if let Some(reason) = self.log.stopped() {
                return Err(pyralog_dma::LogError::Stopped { path: self.log.dir().to_path_buf(), reason });
            }
            self.flushed.listen().await;
        }
    }

    /// The flusher: one per partition, the only caller of `Log::flush`.
    /// The caller sets `flusher_running` before spawning it, so a close that comes before
    /// the task first runs still waits for it.
    pub async fn run_flusher(self: Rc<Self>, metrics: Rc<ShardMetrics>, after_flush: impl Fn(&Partition)) {
        assert!(self.flusher_running.get(), "flusher_running is set before the flusher is spawned");
        let mut last_flush = Instant::now();
        loop {
            // A stopped log (a flush failed) has nothing more to write.
            if !self.log.has_pending() || self.log.stopped().is_some() || self.flush_hold.get() {
                if self.closing.get() {
                    break;
                }
                self.flusher_wake.listen().await;
                continue;
            }
            if let Durability::Cached { flush_interval, flush_bytes } = self.durability {
                let due = last_flush + flush_interval;
                let now = Instant::now();
                if !self.closing.get() && now < due && self.log.unflushed_bytes() < flush_bytes {
                    futures_lite::future::or(self.flusher_wake.listen(), glommio::timer::sleep(due - now))
                        .await;
                    continue;
                }
            }
            let bytes = self.log.unflushed_bytes();
            let started = Instant::now();
            let result = self.log.flush().await;
            last_flush = Instant::now();
            if result.is_ok() {
                metrics.flush_duration.observe((last_flush - started).as_secs_f64());
                metrics.flush_size.observe(bytes as f64);
                metrics.flushed_bytes.inc_by(bytes);
            }
            if let Err(error) = &result {
                eprintln!(
                    "pyralog: partition {}/{} stopped taking writes: {error}",
                    self.topic, self.partition
                );
            }
            after_flush(&self);
            self.flushed.notify();
            if self.durability == Durability::Sync {
                self.data_arrived.notify();
            }
        }
        self.flusher_running.set(false);
        self.flusher_done.notify();
    }

    /// Stops the flusher after it has flushed what is pending.
    pub async fn stop_flusher(&self) {
        self.closing.set(true);
        self.flusher_wake.notify();
        while self.flusher_running.get() {
            self.flusher_done.listen().await;
        }
    }
}
