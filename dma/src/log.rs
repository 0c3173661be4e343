//! A partition's log: its segments, the batches waiting to be written, and the offsets that
//! say how far each has got.
//!
//! Three offsets order everything (`log_start <= durable <= next`):
//! - `next`: the offset the next appended record gets. [`Log::append`] assigns offsets at once,
//!   in memory, by writing `baseOffset` into each batch header.
//! - `durable`: everything below it is written and fdatasync'ed. [`Log::flush`] moves it.
//! - `log_start`: the first offset still kept; retention moves it forward.
//!
//! Group commit is the caller's loop: append as requests arrive, call `flush` whenever none is
//! in flight, and answer every request whose offsets are below the returned durable offset.
//! Whatever arrives during a flush goes into the next one.
//!
//! Crash safety. A new segment file and its directory entry are synced in the same flush that
//! first writes to it, before that flush returns, so nothing acknowledged after a flush can
//! live in a file the directory forgot. At open, the last segment is checked batch by batch
//! and cut at the first batch whose length, CRC or offset is wrong. Only the last segment can
//! hold a torn write: the others were complete and synced before the next one was created, so
//! damage in one of them fails the open and no file is changed.
//!
//! Write errors (fsyncgate). After a failed write or fdatasync the kernel may already have
//! dropped the dirty pages, so a retried fdatasync can "succeed" and lose data. The first failure
//! therefore stops the log for writes, for good: every later append and flush returns
//! [`LogError::Stopped`]. Reads of what was durable before keep working. Restarting the process
//! re-reads the file from disk, which is the only recovery that can be trusted.
//!
//! Only the shard that owns the partition touches its `Log`; the type is `!Send`.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::io::{Directory, DmaBuffer, DmaFile};

use crate::batch::{self, BatchHeader};
use crate::segment::{
    self, align_down, Resume, Segment, StampedBatch, BLOCK_BYTES, DSYNC_FLUSH_BYTES_MAX, SEGMENT_BYTES_MAX,
    SEGMENT_OFFSET_SPAN_MAX, WRITE_CHUNK_BYTES_MAX, ZERO_AHEAD_BYTES, ZERO_AHEAD_FLUSH_BYTES_MAX,
};
use crate::{LogError, Result};

/// Smallest payload whose offsets are stamped in the caller's buffer rather than a copy.
const IN_PLACE_MIN_BYTES: usize = 64 << 10;
/// Unused capacity a caller's buffer may have and still be kept as the stored batches.
const IN_PLACE_SLACK_BYTES: usize = 4 << 10;

/// Default bytes of segment data between two index entries. Indexes live in memory (24 bytes
/// an entry at most), so this sets their cost: 0.04% of the data at 64 KiB, against 0.6% at
/// Kafka's 4 KiB. A lookup then scans at most this much past its entry, inside one 256 KiB
/// readahead window.
pub const INDEX_INTERVAL_BYTES: u32 = 64 << 10;

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A segment is closed and a new one started before it would grow past this. At most
    /// [`SEGMENT_BYTES_MAX`].
    pub segment_bytes: u64,
    /// Bytes of segment data between two index entries.
    pub index_interval_bytes: u32,
    /// Delete the oldest closed segments while the log would still be at least this large.
    pub retention_bytes: Option<u64>,
    /// Delete closed segments whose newest record is older than this.
    pub retention_ms: Option<u64>,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes: 1 << 30,
            index_interval_bytes: INDEX_INTERVAL_BYTES,
            retention_bytes: None,
            retention_ms: None,
        }
    }
}

impl LogConfig {
    /// Checks the limits [`Log::open`] enforces, for callers that want to refuse a bad
    /// configuration before they open anything: `segment_bytes` at most [`SEGMENT_BYTES_MAX`].
    pub fn validate(&self) -> Result<()> {
        if self.segment_bytes > SEGMENT_BYTES_MAX {
            return Err(LogError::TooLarge {
                what: "segment_bytes",
                bytes: self.segment_bytes,
                limit: SEGMENT_BYTES_MAX,
            });
        }
        Ok(())
    }
}

/// Where an append put its batches.
#[derive(Debug, Clone)]
pub struct Appended {
    pub base_offset: i64,
    pub next_offset: i64,
    /// The batches with their offsets, in the exact bytes that will be stored.
    pub batches: Vec<StampedBatch>,
}

pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    segments: RefCell<BTreeMap<i64, Rc<Segment>>>,
    state: RefCell<WriteState>,
    /// The disk reads that sequential readers ask for next, one read ahead per reader (at
    /// most [`READ_AHEADS_PER_LOG`]), each started when its reader asked for the read before.
    /// Dropped (cancelled) whenever durable batches go away (truncation, segment deletion).
    /// Shared with the thread's list of read aheads, which drops idle ones when others need
    /// their memory.
    read_aheads: Rc<RefCell<Vec<ReadAhead>>>,
    /// Bumped whenever bytes read before may no longer be served: a truncation (new batches
    /// may replace the removed ones at the same offsets and positions), a segment deletion,
    /// close. A read that overlapped one reads again and starts no read ahead.
    read_generation: Cell<u64>,
    /// Set by [`Log::close`]: reads under way end with [`LogError::Closed`].
    closed: Cell<bool>,
}

/// Reads of `max_bytes` each, one after another from `offset` on, on their way: a task reads
/// them at most [`READ_AHEAD_DEPTH`] ahead of the reader, so the disk reads the next one while
/// the reader's response goes out and its next request comes in.
struct ReadAhead {
    /// The offset the reader asks for next.
    offset: i64,
    /// Where the task stops: the end of the segment or of what was durable when it started.
    stop: i64,
    max_bytes: usize,
    min_one: bool,
    /// When the reader last took a read (or the read ahead started).
    taken_at: Instant,
    /// The reads, in order; closed after the last one the task could make (the end of the
    /// segment or of what was durable when it started, or an error).
    reads: LocalReceiver<Result<Option<(Bytes, i64)>>>,
    task: glommio::Task<()>,
    _reserved: ReadAheadBytes,
}

impl ReadAhead {
    /// Whether this is the read ahead of a reader asking for `offset` with these limits.
    fn wants(&self, offset: i64, max_bytes: usize, min_one: bool) -> bool {
        self.offset == offset && self.max_bytes == max_bytes && self.min_one == min_one
    }
}

/// Reads a sequential reader's read ahead makes before the reader takes them: one waiting for
/// the reader while the disk reads the next. One alone left the disk idle from the moment it
/// was read until the reader's next request came (77% busy catching up, against fio's 85%).
const READ_AHEAD_DEPTH: usize = 2;

/// The most bytes a thread (a shard) holds for all its logs' read aheads: each reserves
/// [`READ_AHEAD_DEPTH`] reads of its reader's `max_bytes` (at least a disk window each);
/// readers beyond it read as they ask.
pub const READ_AHEAD_BYTES_MAX: usize = 16 << 20;

/// Readers of one log that each keep a read ahead (consumers of different groups catching up
/// at different offsets); a new one replaces the one whose reader took a read longest ago.
const READ_AHEADS_PER_LOG: usize = 4;

/// A read ahead whose reader has taken nothing for this long (gone, or stalled) is dropped
/// when another reader needs its share of [`READ_AHEAD_BYTES_MAX`].
const READ_AHEAD_IDLE: Duration = Duration::from_secs(1);

thread_local! {
    static READ_AHEAD_BYTES: Cell<usize> = const { Cell::new(0) };
    /// The read aheads of the thread's logs.
    static READ_AHEADS: RefCell<Vec<Weak<RefCell<Vec<ReadAhead>>>>> = const { RefCell::new(Vec::new()) };
}

/// Adds a log's read aheads to the thread's list (dropping those of logs gone).
fn register_read_aheads(slot: &Rc<RefCell<Vec<ReadAhead>>>) {
    READ_AHEADS.with(|slots| {
        let mut slots = slots.borrow_mut();
        if slots.len().is_power_of_two() {
            slots.retain(|slot| slot.strong_count() > 0);
        }
        slots.push(Rc::downgrade(slot));
    });
}

/// Adds `ahead` to a log's read aheads, first dropping the ones taken from longest ago while
/// the log has [`READ_AHEADS_PER_LOG`].
fn keep_read_ahead(aheads: &mut Vec<ReadAhead>, ahead: ReadAhead) {
    while aheads.len() >= READ_AHEADS_PER_LOG {
        let oldest = (0..aheads.len()).min_by_key(|&i| aheads[i].taken_at).expect("not empty");
        aheads.swap_remove(oldest);
    }
    aheads.push(ahead);
}

/// Drops the read aheads of the thread whose readers have taken nothing for
/// [`READ_AHEAD_IDLE`], giving their shares back.
fn drop_idle_read_aheads() {
    let now = Instant::now();
    let slots: Vec<_> = READ_AHEADS.with(|slots| slots.borrow().iter().filter_map(Weak::upgrade).collect());
    for slot in slots {
        // Read aheads borrowed now are being changed by their own log: not idle.
        let Ok(mut aheads) = slot.try_borrow_mut() else { continue };
        aheads.retain(|ahead| now.duration_since(ahead.taken_at) < READ_AHEAD_IDLE);
    }
}

/// A share of [`READ_AHEAD_BYTES_MAX`], given back on drop.
struct ReadAheadBytes(usize);

impl ReadAheadBytes {
    fn reserve(bytes: usize) -> Option<ReadAheadBytes> {
        READ_AHEAD_BYTES.with(|used| {
            let total = used.get().checked_add(bytes).filter(|&total| total <= READ_AHEAD_BYTES_MAX)?;
            used.set(total);
            Some(ReadAheadBytes(bytes))
        })
    }
}

impl Drop for ReadAheadBytes {
    fn drop(&mut self) {
        READ_AHEAD_BYTES.with(|used| used.set(used.get() - self.0));
    }
}

struct WriteState {
    next_offset: i64,
    durable_offset: i64,
    pending: Vec<StampedBatch>,
    /// Bytes appended and not yet durable, including a flush in flight.
    unflushed_bytes: u64,
    /// The active segment's last partial block (see `segment`).
    tail: Vec<u8>,
    stopped: Option<String>,
    flushing: bool,
    /// A `truncate_from` is running: appends and flushes are refused meanwhile.
    truncating: bool,
    leader_epoch: i32,
}

impl WriteState {
    /// Stops the log for writes after a flush that did not complete (the first reason
    /// stays). What is still pending will never be written: left pending, it would keep the
    /// flusher busy with a log that refuses to flush.
    fn stop_discarding_pending(&mut self, reason: String) {
        self.flushing = false;
        self.pending.clear();
        self.unflushed_bytes = 0;
        self.stopped.get_or_insert(reason);
    }
}

/// A running truncation, for as long as it lives (see [`Log::truncate_from`]). Dropped while
/// `changing` (the truncation's future was cancelled after it started changing the log), it
/// stops the log, as an error there does.
struct Truncation<'a> {
    state: &'a RefCell<WriteState>,
    changing: bool,
}

impl Drop for Truncation<'_> {
    fn drop(&mut self) {
        let mut state = self.state.borrow_mut();
        assert!(state.truncating, "one truncation at a time");
        state.truncating = false;
        if self.changing && state.stopped.is_none() {
            state.stopped = Some("a truncation was cancelled while it changed the log".to_string());
        }
        if state.flushing {
            // Cancelled during its own flush: the batches that flush took are neither pending
            // nor known to be written. Nothing may write after that.
            state.stop_discarding_pending("a truncation was cancelled during its flush".to_string());
        }
    }
}

impl Log {
    /// Opens the log in `dir`, creating it if needed, and recovers its last segment (cuts it
    /// after its last good batch). Damage anywhere else (a bad batch in a sealed segment, a
    /// segment that does not start where the one before ends) fails the open and changes no
    /// file.
    pub async fn open(dir: &Path, config: LogConfig) -> Result<Log> {
        config.validate()?;
        assert!(config.segment_bytes >= BLOCK_BYTES, "segments must hold at least one block");
        create_directories(dir).await?;
        crate::settle_device_probe(dir).await?;
        let mut bases = segment_bases(dir)?;
        let mut segments = BTreeMap::new();
        if bases.is_empty() {
            let first = Segment::create(dir, 0, config.index_interval_bytes).await?;
            segments.insert(0, Rc::new(first));
            sync_directory(dir).await?;
        } else {
            bases.sort_unstable();
            let last = *bases.last().expect("not empty");
            for base in bases {
                // Checked before the segment is opened: opening the last one may cut its tail,
                // which must not happen to a log that fails to open.
                if let Some((_, previous)) = segments.last_key_value() {
                    let previous: &Rc<Segment> = previous;
                    if previous.next_offset.get() != base {
                        return Err(LogError::CorruptBatch {
                            reason: format!(
                                "segment {} ends at offset {} (byte {}) but the next segment starts at {base}",
                                previous.path.display(),
                                previous.next_offset.get(),
                                previous.size.get()
                            ),
                        });
                    }
                }
                let sealed = base != last;
                let segment = Segment::open(dir, base, config.index_interval_bytes, sealed).await?;
                segments.insert(base, Rc::new(segment));
            }
        }
        let active = segments.last_key_value().expect("a log has a segment").1.clone();
        let tail = active.read_tail(active.size.get()).await?;
        let next_offset = active.next_offset.get();
        let read_aheads = Rc::new(RefCell::new(Vec::new()));
        register_read_aheads(&read_aheads);
        Ok(Log {
            dir: dir.to_path_buf(),
            config,
            segments: RefCell::new(segments),
            state: RefCell::new(WriteState {
                next_offset,
                durable_offset: next_offset,
                pending: Vec::new(),
                unflushed_bytes: 0,
                tail,
                stopped: None,
                flushing: false,
                truncating: false,
                leader_epoch: 0,
            }),
            read_aheads,
            read_generation: Cell::new(0),
            closed: Cell::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn next_offset(&self) -> i64 {
        self.state.borrow().next_offset
    }

    pub fn durable_offset(&self) -> i64 {
        self.state.borrow().durable_offset
    }

    /// The first offset the log holds. While [`Log::start_at`] replaces the segments (it
    /// waits for the disk with none in place), the offset it starts at: a read meanwhile finds
    /// the log empty there, as it will be.
    pub fn log_start_offset(&self) -> i64 {
        match self.segments.borrow().first_key_value() {
            Some((base, _)) => *base,
            None => self.state.borrow().next_offset,
        }
    }

    pub fn unflushed_bytes(&self) -> u64 {
        self.state.borrow().unflushed_bytes
    }

    pub fn has_pending(&self) -> bool {
        !self.state.borrow().pending.is_empty()
    }

    pub fn is_flushing(&self) -> bool {
        self.state.borrow().flushing
    }

    /// The reason writes stopped, if they did.
    pub fn stopped(&self) -> Option<String> {
        self.state.borrow().stopped.clone()
    }

    /// Bytes in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.borrow().values().map(|s| s.size.get()).sum()
    }

    /// The base offset of the newest segments holding at least `bytes` (all of them if the log
    /// is smaller): where a scan of the log's recent history starts.
    pub fn recent_start_offset(&self, bytes: u64) -> i64 {
        let segments = self.segments.borrow();
        let mut total = 0;
        for (base, segment) in segments.iter().rev() {
            total += segment.size.get();
            if total >= bytes {
                return *base;
            }
        }
        drop(segments);
        self.log_start_offset()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.borrow().len()
    }

    /// Assigns offsets to the checked batches of `payload` (`headers` from
    /// [`batch::parse_all`]) and queues them for the next flush. Either every batch is
    /// appended or none is. Refused while a truncation runs (see [`Log::truncate_from`]).
    pub fn append(&self, payload: Bytes, headers: &[BatchHeader]) -> Result<Appended> {
        assert!(!headers.is_empty(), "append of no batch");
        let mut state = self.state.borrow_mut();
        if let Some(reason) = &state.stopped {
            return Err(LogError::Stopped { path: self.dir.clone(), reason: reason.clone() });
        }
        if state.truncating {
            return Err(self.busy("appending", "a truncation"));
        }
        let total: u64 = headers.iter().map(|h| u64::from(h.total_bytes)).sum();
        assert_eq!(total, payload.len() as u64, "headers must cover the payload exactly");
        // Offsets are stamped into the batches' headers: in place when the caller's buffer is
        // large, not shared and holds little else (a request frame with an allocation of its
        // own), else in a copy. The stored bytes are kept by the cache, which counts their
        // length: a buffer pinning much more memory than that must not be kept.
        let mut copy = match payload.try_into_mut() {
            Ok(own)
                if own.len() >= IN_PLACE_MIN_BYTES && own.capacity() <= own.len() + IN_PLACE_SLACK_BYTES =>
            {
                own
            }
            Ok(own) => BytesMut::from(&own[..]),
            Err(shared) => BytesMut::from(&shared[..]),
        };
        let base_offset = state.next_offset;
        let mut next_offset = base_offset;
        let mut at = 0usize;
        let mut stamped = Vec::with_capacity(headers.len());
        for header in headers {
            let len = header.total_bytes as usize;
            batch::set_base_offset(&mut copy[at..at + len], next_offset);
            batch::set_leader_epoch(&mut copy[at..at + len], state.leader_epoch);
            let mut header = *header;
            header.base_offset = next_offset;
            header.leader_epoch = state.leader_epoch;
            stamped.push((header, at, len));
            next_offset += header.offset_count();
            at += len;
        }
        let frozen = copy.freeze();
        let batches: Vec<StampedBatch> = stamped
            .into_iter()
            .map(|(header, at, len)| StampedBatch { header, bytes: frozen.slice(at..at + len) })
            .collect();
        assert!(next_offset > state.next_offset, "offsets only grow");
        state.next_offset = next_offset;
        state.unflushed_bytes += total;
        state.pending.extend(batches.iter().cloned());
        Ok(Appended { base_offset, next_offset, batches })
    }

    /// Appends batches a Raft leader already stamped (a replicated partition's follower, or
    /// its leader after the consensus core stamped them): their offsets and epochs are kept,
    /// byte for byte. Each batch is checked (length, magic, CRC-32C) and must start where the
    /// log ends, one after another; anything else is refused and nothing is appended.
    pub fn append_stamped(&self, batches: &[Bytes]) -> Result<Appended> {
        assert!(!batches.is_empty(), "append of no batch");
        let mut state = self.state.borrow_mut();
        if let Some(reason) = &state.stopped {
            return Err(LogError::Stopped { path: self.dir.clone(), reason: reason.clone() });
        }
        if state.truncating {
            return Err(self.busy("appending", "a truncation"));
        }
        let base_offset = state.next_offset;
        let mut next_offset = base_offset;
        let mut stamped = Vec::with_capacity(batches.len());
        for bytes in batches {
            let header = batch::parse(bytes)?;
            if header.total_bytes as usize != bytes.len() {
                return Err(LogError::CorruptBatch {
                    reason: format!("{} bytes follow a batch of {}", bytes.len(), header.total_bytes),
                });
            }
            if header.base_offset != next_offset {
                return Err(LogError::CorruptBatch {
                    reason: format!(
                        "a replicated batch starts at offset {} but the log of {} continues at {next_offset}",
                        header.base_offset,
                        self.dir.display()
                    ),
                });
            }
            next_offset = header.next_offset();
            stamped.push(StampedBatch { header, bytes: bytes.clone() });
        }
        assert!(next_offset > state.next_offset, "offsets only grow");
        state.next_offset = next_offset;
        state.unflushed_bytes += stamped.iter().map(|b| u64::from(b.header.total_bytes)).sum::<u64>();
        state.pending.extend(stamped.iter().cloned());
        Ok(Appended { base_offset, next_offset, batches: stamped })
    }

    /// Writes every pending batch, fdatasyncs, and returns the new durable offset. One flush
    /// at a time: the caller serializes them. Refused while a truncation runs (see
    /// [`Log::truncate_from`]).
    pub async fn flush(&self) -> Result<i64> {
        if self.state.borrow().truncating {
            return Err(self.busy("flushing", "a truncation"));
        }
        self.flush_pending().await
    }

    /// The error of a write that overlaps one it must not overlap: the caller did not
    /// serialize them as [`Log::truncate_from`] requires. Nothing was changed.
    fn busy(&self, op: &'static str, running: &str) -> LogError {
        let message = format!(
            "{running} is in progress; truncate_from must not overlap a flush, an append or another \
             truncation"
        );
        LogError::io(op, &self.dir, std::io::Error::new(std::io::ErrorKind::ResourceBusy, message))
    }

    async fn flush_pending(&self) -> Result<i64> {
        let batches = {
            let mut state = self.state.borrow_mut();
            if let Some(reason) = &state.stopped {
                return Err(LogError::Stopped { path: self.dir.clone(), reason: reason.clone() });
            }
            assert!(!state.flushing, "flushes must not overlap");
            if state.pending.is_empty() {
                return Ok(state.durable_offset);
            }
            state.flushing = true;
            std::mem::take(&mut state.pending)
        };
        let result = self.write_batches(&batches).await;
        let mut state = self.state.borrow_mut();
        match result {
            Ok(()) => {
                state.flushing = false;
                let durable = batches.last().expect("not empty").header.next_offset();
                assert!(durable > state.durable_offset, "the durable offset only grows");
                state.durable_offset = durable;
                state.unflushed_bytes -= batches.iter().map(|b| b.bytes.len() as u64).sum::<u64>();
                Ok(durable)
            }
            Err(error) => {
                state.stop_discarding_pending(error.to_string());
                Err(error)
            }
        }
    }

    async fn write_batches(&self, batches: &[StampedBatch]) -> Result<()> {
        let mut first = 0;
        while first < batches.len() {
            let active = self.active_segment();
            let mut size = active.size.get();
            let mut end = first;
            while end < batches.len() {
                let len = batches[end].bytes.len() as u64;
                // A segment also rolls before its offsets outgrow the index's u32 relative
                // offsets: a compressed batch may hold up to 2^31 records in a few bytes.
                let relative = batches[end].header.base_offset - active.base_offset;
                if size > 0 && (size + len > self.config.segment_bytes || relative > SEGMENT_OFFSET_SPAN_MAX)
                {
                    break;
                }
                size += len;
                end += 1;
            }
            if end == first {
                self.roll(batches[first].header.base_offset).await?;
                continue;
            }
            self.write_segment(&active, &batches[first..end]).await?;
            first = end;
        }
        Ok(())
    }

    /// Writes `batches` after the segment's durable end, rewriting its tail block (and, for a
    /// small flush, zeros ahead of them: [`ZERO_AHEAD_BYTES`]), makes them durable and
    /// publishes the new size and index entries.
    ///
    /// A small flush (at most [`DSYNC_FLUSH_BYTES_MAX`]) writes its batches through the
    /// segment's O_DSYNC descriptor, durable when the write completes: one request where a
    /// write and an fdatasync are two, and io_uring hands the fdatasync to a worker thread (a
    /// wake-up and a context switch per flush). Its zeros go through the plain descriptor:
    /// they extend the file, and an extending O_DSYNC write holds the inode's lock through
    /// its sync, stalling the batches' write beside it; what makes them readable (their
    /// blocks, the file's size) is committed by the first O_DSYNC write into them, as an
    /// O_DSYNC write makes durable what reading its data back needs (and nothing reads them
    /// before: past `size`, an open cuts them off). A larger flush writes its chunks and
    /// fdatasyncs once, where O_DSYNC would sync each chunk. Measured (bench/RESULTS.md,
    /// session 19): see [`DSYNC_FLUSH_BYTES_MAX`].
    async fn write_segment(&self, segment: &Segment, batches: &[StampedBatch]) -> Result<()> {
        let size = segment.size.get();
        let end = size + batches.iter().map(|b| b.bytes.len() as u64).sum::<u64>();
        // A descriptor that cannot be opened (no descriptors left) costs the flush only its
        // speed: it writes and fdatasyncs as a large one does, and the next one tries again.
        let dsync_file =
            if end - size <= DSYNC_FLUSH_BYTES_MAX { segment.dsync_file().await.ok() } else { None };
        let dsync = dsync_file.is_some();
        let file = dsync_file.unwrap_or_else(|| Rc::clone(&segment.file));
        let start = align_down(size);
        let tail = std::mem::take(&mut self.state.borrow_mut().tail);
        assert_eq!(tail.len() as u64, size - start, "the tail is the last partial block");
        let zeros = self.zero_ahead(segment, end);
        let write_zeros = async {
            let Some((at, bytes)) = zeros else { return Ok(()) };
            let mut buffer = segment.file.alloc_dma_buffer(bytes);
            buffer.as_bytes_mut().fill(0);
            write_fully(&segment.file, &segment.path, buffer, at).await
        };
        let (new_tail, zeroed) = futures_lite::future::zip(
            self.write_blocks_of(&file, &segment.path, start, tail, batches, end),
            write_zeros,
        )
        .await;
        let new_tail = new_tail?;
        // Zeros refused for room (they take it before the batches do) cost the batches
        // nothing: blocks past `size` are never read, and an open cuts them off. Any other
        // failure stops the log, as a failed write of batches does.
        let zeros = match zeroed {
            Ok(()) => zeros,
            Err(error) if error.is_no_space() => None,
            Err(error) => return Err(error),
        };
        if !dsync {
            segment
                .file
                .fdatasync()
                .await
                .map_err(|e| LogError::io("fdatasync of segment", &segment.path, e))?;
        }
        let written_end = segment::align_up(end).max(zeros.map_or(0, |(at, bytes)| at + bytes as u64));
        segment.zeroed_end.set(segment.zeroed_end.get().max(written_end));
        let mut index = segment.index.borrow_mut();
        let mut at = size;
        for batch in batches {
            index.on_batch(&batch.header, segment::position_u32(at));
            at += batch.bytes.len() as u64;
        }
        segment.size.set(end);
        segment.next_offset.set(batches.last().expect("not empty").header.next_offset());
        self.state.borrow_mut().tail = new_tail;
        Ok(())
    }

    /// Where a flush writing the segment up to `end` zeroes ahead, if it does: a small one
    /// whose end comes within half of [`ZERO_AHEAD_BYTES`] of the written blocks' end zeroes
    /// the next [`ZERO_AHEAD_BYTES`] (fewer at the segment's configured size, none past it),
    /// right after both ends, so never a block the batches' writes touch.
    fn zero_ahead(&self, segment: &Segment, end: u64) -> Option<(u64, usize)> {
        let flushed = end - segment.size.get();
        let end = segment::align_up(end);
        let from = segment.zeroed_end.get().max(end);
        let limit = segment::align_up(self.config.segment_bytes);
        if flushed > ZERO_AHEAD_FLUSH_BYTES_MAX || from >= end + ZERO_AHEAD_BYTES as u64 / 2 || from >= limit
        {
            return None;
        }
        Some((from, (limit - from).min(ZERO_AHEAD_BYTES as u64) as usize))
    }

    /// The batches' writes of [`Log::write_segment`], from the tail block at `start` on;
    /// returns the new tail (the last partial block).
    async fn write_blocks_of(
        &self,
        file: &DmaFile,
        path: &Path,
        start: u64,
        tail: Vec<u8>,
        batches: &[StampedBatch],
        end: u64,
    ) -> Result<Vec<u8>> {
        let mut pieces = std::iter::once(&tail[..]).chain(batches.iter().map(|b| &b.bytes[..]));
        let mut piece: &[u8] = &[];
        let mut position = start;
        let mut new_tail = Vec::new();
        while position < end {
            let data_bytes = ((end - position) as usize).min(WRITE_CHUNK_BYTES_MAX);
            let buffer_bytes = segment::align_up(data_bytes as u64) as usize;
            let mut buffer = file.alloc_dma_buffer(buffer_bytes);
            let out = buffer.as_bytes_mut();
            let mut filled = 0;
            while filled < data_bytes {
                if piece.is_empty() {
                    piece = pieces.next().expect("pieces cover the range");
                    continue;
                }
                let n = piece.len().min(data_bytes - filled);
                out[filled..filled + n].copy_from_slice(&piece[..n]);
                piece = &piece[n..];
                filled += n;
            }
            out[filled..].fill(0);
            if position + buffer_bytes as u64 >= end {
                let tail_from = (align_down(end) - position) as usize;
                new_tail = out[tail_from..data_bytes].to_vec();
            }
            write_fully(file, path, buffer, position).await?;
            position += buffer_bytes as u64;
        }
        Ok(new_tail)
    }

    /// Seals the active segment (cuts its zero padding, persists its index) and starts a new
    /// one at `base_offset`, durable in the directory before anything is written to it.
    async fn roll(&self, base_offset: i64) -> Result<()> {
        let active = self.active_segment();
        assert_eq!(active.next_offset.get(), base_offset, "a new segment starts where the last ended");
        active.cut_at(active.size.get(), "sealing segment").await?;
        active.seal_writes();
        active.persist_index(&self.dir)?;
        active.index.borrow_mut().shrink_to_fit();
        let segment = Segment::create(&self.dir, base_offset, self.config.index_interval_bytes).await?;
        sync_directory(&self.dir).await?;
        self.segments.borrow_mut().insert(base_offset, Rc::new(segment));
        self.state.borrow_mut().tail.clear();
        Ok(())
    }

    fn active_segment(&self) -> Rc<Segment> {
        self.segments.borrow().last_key_value().expect("a log has a segment").1.clone()
    }

    fn segment_for(&self, offset: i64) -> Option<Rc<Segment>> {
        self.segments.borrow().range(..=offset).next_back().map(|(_, s)| s.clone())
    }

    fn check_range(&self, offset: i64) -> Result<()> {
        let (log_start, log_end) = (self.log_start_offset(), self.next_offset());
        if offset < log_start || offset > log_end {
            return Err(LogError::OffsetOutOfRange { offset, log_start, log_end });
        }
        Ok(())
    }

    /// Reads durable batches from the one holding `offset`, up to `max_bytes` (at least one
    /// whole batch). `None` when nothing durable is at or after `offset` yet.
    ///
    /// Only whole batches below the durable offset (the high watermark) are returned. A
    /// segment's size is not that bound: a flush publishes each segment's new size after its
    /// fdatasync, but moves the durable offset only when all of it, rolls included, is done.
    pub async fn read(&self, offset: i64, max_bytes: usize) -> Result<Option<Bytes>> {
        self.read_batches(offset, max_bytes, true).await
    }

    /// [`Log::read`] within `max_bytes` strictly: `None` also when the batch holding `offset`
    /// is larger (never read past `max_bytes`, nor the disk window of a read). For the
    /// partitions of a fetch after the first, whose budget is what the response has left.
    pub async fn read_within(&self, offset: i64, max_bytes: usize) -> Result<Option<Bytes>> {
        self.read_batches(offset, max_bytes, false).await
    }

    async fn read_batches(&self, offset: i64, max_bytes: usize, min_one: bool) -> Result<Option<Bytes>> {
        loop {
            if self.closed.get() {
                return Err(LogError::Closed { path: self.dir.clone() });
            }
            self.check_range(offset)?;
            let generation = self.read_generation.get();
            let read = self.read_once(offset, max_bytes, min_one, generation).await;
            // A truncation (or deletion) meanwhile: what was read may be bytes it removed.
            if self.read_generation.get() == generation {
                return read;
            }
        }
    }

    /// One read for [`Log::read_batches`], from the read ahead if it has it. Starts or keeps a
    /// read ahead only while the read generation is still `generation`.
    async fn read_once(
        &self,
        offset: i64,
        max_bytes: usize,
        min_one: bool,
        generation: u64,
    ) -> Result<Option<Bytes>> {
        let ahead = {
            let mut aheads = self.read_aheads.borrow_mut();
            let found = aheads.iter().position(|a| a.wants(offset, max_bytes, min_one));
            found.map(|at| aheads.swap_remove(at))
        };
        if let Some(mut ahead) = ahead {
            match ahead.reads.recv().await {
                Some(Ok(Some((bytes, next)))) => {
                    // Kept while it has more to read (and no other reader's read ahead is at
                    // the same place); otherwise dropped here with its share.
                    let mut aheads = self.read_aheads.borrow_mut();
                    let taken = aheads.iter().any(|a| a.wants(next, max_bytes, min_one));
                    if self.read_generation.get() == generation && next < ahead.stop && !taken {
                        ahead.offset = next;
                        ahead.taken_at = Instant::now();
                        keep_read_ahead(&mut aheads, ahead);
                    }
                    return Ok(Some(bytes));
                }
                Some(Err(error)) => return Err(error),
                // Nothing more ahead: read as asked.
                Some(Ok(None)) | None => {}
            }
        }
        let durable = self.durable_offset();
        let mut from = offset;
        while from < durable {
            let Some(segment) = self.segment_for(from) else { break };
            if let Some(read) = segment.read(from, max_bytes, durable, min_one, None).await? {
                assert!(read.rest.next_offset() <= durable, "a read returns only durable batches");
                if self.read_generation.get() == generation {
                    self.read_ahead_from(read.rest, max_bytes, min_one);
                }
                return Ok(Some(read.bytes));
            }
            // The offset sits at this segment's end: the next segment starts there.
            if segment.next_offset.get() <= from {
                let next = self.segments.borrow().range(from + 1..).next().map(|(base, _)| *base);
                match next {
                    Some(base) => from = base,
                    None => break,
                }
            } else {
                break;
            }
        }
        Ok(None)
    }

    /// Starts reading what follows a read that stopped at `rest`, if that is durable and in
    /// the same segment and the thread has read-ahead memory left (after dropping idle read
    /// aheads, if need be): a consumer catching up asks for it next, and the disk reads it
    /// while this response goes out. It goes on from the bytes that read already holds.
    fn read_ahead_from(&self, rest: Resume, max_bytes: usize, min_one: bool) {
        let offset = rest.next_offset();
        let Some(segment) = self.segment_for(offset) else { return };
        // Bounded by the durable offset of now: it only grows until a truncation, which drops
        // the read ahead.
        let stop = segment.next_offset.get().min(self.durable_offset());
        let here = self.read_aheads.borrow().iter().any(|a| a.wants(offset, max_bytes, min_one));
        let share = READ_AHEAD_DEPTH * max_bytes.max(segment::READAHEAD_BYTES);
        if offset >= stop || here || self.closed.get() || share > READ_AHEAD_BYTES_MAX {
            return;
        }
        let reserved = ReadAheadBytes::reserve(share).or_else(|| {
            drop_idle_read_aheads();
            ReadAheadBytes::reserve(share)
        });
        let Some(reserved) = reserved else { return };
        let (sender, reads) = local_channel::new_bounded(READ_AHEAD_DEPTH - 1);
        let task = glommio::spawn_local(async move {
            let mut rest = Some(rest);
            while let Some(resume) = rest.take() {
                let offset = resume.next_offset();
                if offset >= stop {
                    break;
                }
                let sent = match segment.read(offset, max_bytes, stop, min_one, Some(resume)).await {
                    Ok(Some(read)) => {
                        let next = read.rest.next_offset();
                        rest = Some(read.rest);
                        Ok(Some((read.bytes, next)))
                    }
                    Ok(None) => Ok(None),
                    Err(error) => Err(error),
                };
                if sender.send(sent).await.is_err() {
                    break;
                }
            }
        });
        let taken_at = Instant::now();
        let ahead =
            ReadAhead { offset, stop, max_bytes, min_one, taken_at, reads, task, _reserved: reserved };
        keep_read_ahead(&mut self.read_aheads.borrow_mut(), ahead);
    }

    /// The largest record timestamp among durable batches, if any batch carries one.
    pub fn max_timestamp(&self) -> Option<i64> {
        self.segments.borrow().values().map(|s| s.index.borrow().max_timestamp).filter(|&t| t >= 0).max()
    }

    /// The first offset whose batch has a max timestamp at or after `timestamp`, among durable
    /// batches; `None` if there is none.
    pub async fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<i64>> {
        let durable = self.durable_offset();
        let candidates: Vec<Rc<Segment>> = self
            .segments
            .borrow()
            .values()
            .filter(|s| s.index.borrow().max_timestamp >= timestamp)
            .cloned()
            .collect();
        for segment in candidates {
            if let Some(offset) = segment.offset_for_timestamp(timestamp, durable).await? {
                return Ok(Some(offset));
            }
        }
        Ok(None)
    }

    /// Removes every batch at or after `offset`, which must be a batch boundary inside the log
    /// (Raft truncates a follower's log this way). Pending batches are flushed first, so the
    /// truncation point is always durable.
    ///
    /// Contract: the caller serializes a truncation with every other write. It stops
    /// appending and lets no flush start until the truncation returns, and calls it when no
    /// flush is in flight (a Raft follower stops its appender and flusher first). The log
    /// checks this rather than trusting it: called while a flush or another truncation runs,
    /// it fails with an I/O error of kind `ResourceBusy` and changes nothing; appends and
    /// flushes called while it runs fail the same way, so none of them can write with
    /// offsets or a tail block that the truncation is replacing. Reads may run meanwhile.
    ///
    /// An error before any file changed (an offset out of range or inside a batch, a failed
    /// read) leaves the log as it was. Any error after that stops the log for writes, like a
    /// failed flush: its files are then in a state no write may build on. Later segments are
    /// deleted newest first, and the deletions are synced in the directory before the kept
    /// segment is cut, so whatever an error or a crash leaves behind is still a log whose
    /// segments continue one another. Cancelling the future once it changed the log stops the
    /// log too.
    pub async fn truncate_from(&self, offset: i64) -> Result<()> {
        let mut truncation = self.begin_truncation()?;
        self.flush_pending().await?;
        self.check_range(offset)?;
        if offset == self.next_offset() {
            return Ok(());
        }
        let segment = self.segment_for(offset).expect("offset checked to be in range");
        let position = segment.position_of_batch(offset).await?.ok_or_else(|| LogError::CorruptBatch {
            reason: format!("offset {offset} is not the start of a batch in {}", segment.path.display()),
        })?;
        // Read now, while a failure changes nothing: the bytes before the cut stay as they are.
        let tail = segment.read_tail(position).await?;
        let max_timestamp = segment.max_timestamp_before(position).await?;
        truncation.changing = true;
        let result = self.cut_suffix(&segment, offset, position, tail, max_timestamp).await;
        match &result {
            Ok(()) => truncation.changing = false,
            Err(error) => {
                self.state.borrow_mut().stopped =
                    Some(format!("truncation from offset {offset} failed after it changed the log: {error}"));
            }
        }
        result
    }

    /// Starts a truncation if no other write runs (see [`Log::truncate_from`]).
    fn begin_truncation(&self) -> Result<Truncation<'_>> {
        let mut state = self.state.borrow_mut();
        if let Some(reason) = &state.stopped {
            return Err(LogError::Stopped { path: self.dir.clone(), reason: reason.clone() });
        }
        if state.flushing {
            return Err(self.busy("truncating log", "a flush"));
        }
        if state.truncating {
            return Err(self.busy("truncating log", "another truncation"));
        }
        state.truncating = true;
        Ok(Truncation { state: &self.state, changing: false })
    }

    /// The part of [`Log::truncate_from`] that changes the log: every error here stops it.
    /// `tail` and `max_timestamp` are those of the batches kept in `segment`.
    async fn cut_suffix(
        &self,
        segment: &Segment,
        offset: i64,
        position: u64,
        tail: Vec<u8>,
        max_timestamp: i64,
    ) -> Result<()> {
        // The log's own view first, so no read from here on reaches the bytes being removed.
        self.drop_read_aheads();
        let later = self.segments.borrow_mut().split_off(&(segment.base_offset + 1));
        segment.size.set(position);
        segment.next_offset.set(offset);
        segment.index.borrow_mut().truncate_to(segment::position_u32(position), max_timestamp);
        {
            let mut state = self.state.borrow_mut();
            assert!(state.pending.is_empty(), "the truncation flushed what was pending");
            state.tail = tail;
            state.next_offset = offset;
            state.durable_offset = offset;
        }
        for doomed in later.values().rev() {
            remove_segment_files(&self.dir, doomed)?;
        }
        // The kept segment is the active one now, which has no index file until it is sealed.
        remove_index_file(&self.dir, segment.base_offset)?;
        // The deletions are made durable before the cut: a crash must not bring the deleted
        // segments back behind a cut one, a gap that the next open refuses.
        if !later.is_empty() {
            sync_directory(&self.dir).await?;
        }
        segment.cut_at(position, "truncating segment").await
    }

    /// Takes the read aheads (dropping them cancels them) and voids what reads under way have
    /// read (see `read_generation`).
    fn drop_read_aheads(&self) -> Vec<ReadAhead> {
        self.read_generation.set(self.read_generation.get() + 1);
        std::mem::take(&mut *self.read_aheads.borrow_mut())
    }

    fn remove_segment(&self, segment: &Segment) -> Result<()> {
        self.drop_read_aheads();
        self.segments.borrow_mut().remove(&segment.base_offset);
        remove_segment_files(&self.dir, segment)
    }

    /// Deletes the closed segments that end at or before `offset` (never the active one):
    /// for a log whose owner has rewritten everything before `offset` later in the log.
    /// Returns how many were deleted.
    pub fn remove_segments_before(&self, offset: i64) -> Result<usize> {
        let doomed: Vec<Rc<Segment>> = {
            let segments = self.segments.borrow();
            segments
                .values()
                .take(segments.len() - 1)
                .filter(|segment| segment.next_offset.get() <= offset)
                .cloned()
                .collect()
        };
        for segment in &doomed {
            self.remove_segment(segment)?;
        }
        Ok(doomed.len())
    }

    /// Deletes whole closed segments that retention no longer keeps. Returns how many.
    pub fn apply_retention(&self, now_ms: i64) -> Result<usize> {
        match self.retention_start(now_ms, i64::MAX) {
            Some(start) => self.remove_segments_before(start),
            None => Ok(0),
        }
    }

    /// Where the log would start if retention deleted the closed segments it no longer keeps
    /// among those that end at or below `bound` (for a replicated log, what is committed and
    /// durable): the end of the last of them, or None when it would delete nothing. Deletes
    /// nothing itself ([`Log::remove_segments_before`] does, once the caller agreed).
    pub fn retention_start(&self, now_ms: i64, bound: i64) -> Option<i64> {
        if self.state.borrow().truncating {
            // Not now: the truncation keeps segments this could remove. The next run will do.
            return None;
        }
        let segments = self.segments.borrow();
        let mut total = self.size_bytes();
        let mut start = None;
        for segment in segments.values().take(segments.len() - 1) {
            let size = segment.size.get();
            let over_size = self.config.retention_bytes.is_some_and(|limit| total - size >= limit);
            let max_timestamp = segment.index.borrow().max_timestamp;
            let over_age = self
                .config
                .retention_ms
                .is_some_and(|ms| max_timestamp >= 0 && max_timestamp < now_ms.saturating_sub(ms as i64));
            if !over_size && !over_age || segment.next_offset.get() > bound {
                break;
            }
            total -= size;
            start = Some(segment.next_offset.get());
        }
        start
    }

    /// Where the log would start if every closed segment that ends at or below `bound` went:
    /// the end of the last of them, or None when none would (whatever retention keeps). For
    /// a log whose batches below `bound` were superseded, as a compacted offsets log's are.
    pub fn start_below(&self, bound: i64) -> Option<i64> {
        if self.state.borrow().truncating {
            return None;
        }
        let segments = self.segments.borrow();
        segments
            .values()
            .take(segments.len() - 1)
            .map(|segment| segment.next_offset.get())
            .take_while(|&end| end <= bound)
            .last()
    }

    /// Drops every batch and starts the log, empty, at `offset`: for a replica whose leader's
    /// log starts there, while this log does not reach it (see replication's `StartAt`).
    /// Segments are deleted newest first and the deletions synced before the new segment is
    /// made, so a crash leaves the old log, a prefix of its segments, an empty log at 0
    /// (replication then sees a replica that holds nothing and catches it up) or the new one:
    /// never segments with a gap, which an open refuses. An error after the first deletion
    /// stops the log, as a failed truncation does.
    pub async fn start_at(&self, offset: i64) -> Result<()> {
        assert!(offset >= 0, "a log starts at an offset, not {offset}");
        let mut truncation = self.begin_truncation()?;
        truncation.changing = true;
        let result = self.replace_segments(offset).await;
        match &result {
            Ok(()) => truncation.changing = false,
            Err(error) => {
                self.state.borrow_mut().stopped =
                    Some(format!("starting the log afresh at offset {offset} failed: {error}"));
            }
        }
        result
    }

    /// The part of [`Log::start_at`] that changes the log. The log holds no segment while it
    /// waits for the disk here (see [`Log::log_start_offset`]); reads then find it empty.
    async fn replace_segments(&self, offset: i64) -> Result<()> {
        self.drop_read_aheads();
        let old = std::mem::take(&mut *self.segments.borrow_mut());
        {
            let mut state = self.state.borrow_mut();
            // What waited to be written belonged to the dropped log.
            state.pending.clear();
            state.unflushed_bytes = 0;
            state.tail.clear();
            state.next_offset = offset;
            state.durable_offset = offset;
        }
        for doomed in old.values().rev() {
            remove_segment_files(&self.dir, doomed)?;
        }
        sync_directory(&self.dir).await?;
        let segment = Segment::create(&self.dir, offset, self.config.index_interval_bytes).await?;
        sync_directory(&self.dir).await?;
        self.segments.borrow_mut().insert(offset, Rc::new(segment));
        Ok(())
    }

    /// Flushes and closes every file. The log is unusable afterwards.
    pub async fn close(&self) -> Result<()> {
        if self.stopped().is_none() {
            self.flush().await?;
        }
        // Stop a read ahead: it holds its segment, whose file is closed below. (Not by
        // dropping its receiver: glommio 0.9's bounded send waits for room even then.)
        self.closed.set(true);
        for ahead in self.drop_read_aheads() {
            ahead.task.cancel().await;
        }
        let segments = std::mem::take(&mut *self.segments.borrow_mut());
        for segment in segments.into_values() {
            if let Ok(segment) = Rc::try_unwrap(segment) {
                if let Ok(file) = Rc::try_unwrap(segment.file) {
                    file.close().await.map_err(|e| LogError::io("closing segment", &segment.path, e))?;
                }
            }
        }
        Ok(())
    }
}

/// Writes all of `buffer` at `position`. A short write (the kernel wrote what fit) continues
/// with the rest, so a full disk surfaces as the ENOSPC of the next write, not as a bare count.
/// Callers write one chunk at a time: ext4 takes the inode lock exclusively for appending
/// O_DIRECT writes, so concurrent appends cannot be issued inline and io_uring punts them to
/// worker threads (measured: four in flight cost 20-30% more system time, wrote no faster).
async fn write_fully(file: &DmaFile, path: &Path, buffer: DmaBuffer, position: u64) -> Result<()> {
    let write = move |buffer: Rc<DmaBuffer>, at: u64| async move {
        file.write_rc_at(buffer, at).await.map_err(std::io::Error::from)
    };
    write_blocks(file, path, buffer, position, write).await
}

/// The loop of [`write_fully`], over any `write` (a test gives one that writes short). Both
/// `position` and the length of `buffer` are block-aligned, and every write must start on a
/// block too (O_DIRECT fails anything else with EINVAL). So after a short write the rest
/// starts at the last block boundary the write reached, and the block it ended inside is
/// written again from the buffer. A write that reaches no new boundary is an error: its
/// retry would start where it started.
async fn write_blocks<W, F>(
    file: &DmaFile,
    path: &Path,
    buffer: DmaBuffer,
    position: u64,
    mut write: W,
) -> Result<()>
where
    W: FnMut(Rc<DmaBuffer>, u64) -> F,
    F: std::future::Future<Output = std::io::Result<usize>>,
{
    let total = buffer.len();
    assert_eq!(position % BLOCK_BYTES, 0, "O_DIRECT writes start on a block");
    assert_eq!(total as u64 % BLOCK_BYTES, 0, "O_DIRECT writes whole blocks");
    let first = Rc::new(buffer);
    let mut current = Rc::clone(&first);
    // Bytes of `first` written, always whole blocks: where the next write starts.
    let mut done = 0;
    loop {
        let asked = current.len();
        let written = write(Rc::clone(&current), position + done as u64)
            .await
            .map_err(|e| LogError::io("writing segment", path, e))?;
        assert!(written <= asked, "a write reports at most what it was given");
        let reached = done + written;
        if reached == total {
            return Ok(());
        }
        let resume = align_down(reached as u64) as usize;
        if resume == done {
            let stuck = std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("wrote {reached} of {total} bytes, the last write not one whole block"),
            );
            return Err(LogError::io("writing segment", path, stuck));
        }
        done = resume;
        let mut rest = file.alloc_dma_buffer(total - done);
        rest.as_bytes_mut().copy_from_slice(&first.as_bytes()[done..]);
        current = Rc::new(rest);
    }
}

/// Deletes a segment's file and its index file, if it has one.
fn remove_segment_files(dir: &Path, segment: &Segment) -> Result<()> {
    std::fs::remove_file(&segment.path).map_err(|e| LogError::io("deleting segment", &segment.path, e))?;
    remove_index_file(dir, segment.base_offset)
}

fn remove_index_file(dir: &Path, base_offset: i64) -> Result<()> {
    let index = dir.join(segment::index_file_name(base_offset));
    match std::fs::remove_file(&index) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LogError::io("deleting index", &index, e)),
        _ => Ok(()),
    }
}

/// Creates `dir` and any missing ancestors, and syncs the parent of each one created, so
/// the whole path survives a crash once anything in it is acknowledged.
async fn create_directories(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> =
        dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
    std::fs::create_dir_all(dir).map_err(|e| LogError::io("creating log directory", dir, e))?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_directory(parent).await?;
        }
    }
    Ok(())
}

pub(crate) async fn sync_directory(dir: &Path) -> Result<()> {
    #[cfg(test)]
    if tests::DIRECTORY_SYNC_FAILS.with(std::cell::Cell::get) {
        return Err(LogError::io(
            "fsync of directory",
            dir,
            std::io::Error::other("failure injected by a test"),
        ));
    }
    // glommio opens a directory relative to no directory at all (EBADF): name it absolutely.
    let dir = &std::path::absolute(dir).map_err(|e| LogError::io("resolving directory", dir, e))?;
    let directory = Directory::open(dir).await.map_err(|e| LogError::io("opening directory", dir, e))?;
    directory.sync().await.map_err(|e| LogError::io("fsync of directory", dir, e))?;
    directory.close().await.map_err(|e| LogError::io("closing directory", dir, e))
}

fn segment_bases(dir: &Path) -> Result<Vec<i64>> {
    let entries = std::fs::read_dir(dir).map_err(|e| LogError::io("listing log directory", dir, e))?;
    let mut bases = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io("listing log directory", dir, e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else { continue };
        if let Ok(base) = stem.parse::<i64>() {
            bases.push(base);
        }
    }
    Ok(bases)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Wake, Waker};

    thread_local! {
        /// Makes `sync_directory` fail, as a crash before the sync completes would leave it.
        pub(super) static DIRECTORY_SYNC_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    pub(crate) fn run<T>(future: impl Future<Output = T>) -> T {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(256 << 10)
            .make()
            .expect("executor")
            .run(future)
    }

    fn small_config() -> LogConfig {
        LogConfig { segment_bytes: 16 << 10, index_interval_bytes: 1024, ..LogConfig::default() }
    }

    /// Appends `batches` batches of `records` records each, one flush per `per_flush` batches.
    async fn fill(log: &Log, batches: usize, records: usize, per_flush: usize) -> Vec<(i64, i64)> {
        let mut ranges = Vec::new();
        for i in 0..batches {
            let bytes = batch::build_for_tests(records, format!("value-{i:06}").as_bytes(), 1000 + i as i64);
            let headers = batch::parse_all(&bytes).unwrap();
            let appended = log.append(Bytes::from(bytes), &headers).unwrap();
            ranges.push((appended.base_offset, appended.next_offset));
            if (i + 1) % per_flush == 0 {
                log.flush().await.unwrap();
            }
        }
        log.flush().await.unwrap();
        ranges
    }

    async fn read_all(log: &Log, from: i64) -> Vec<BatchHeader> {
        let mut headers = Vec::new();
        let mut offset = from;
        while let Some(bytes) = log.read(offset, 4096).await.unwrap() {
            let parsed = batch::parse_all(&bytes).unwrap();
            offset = parsed.last().unwrap().next_offset();
            headers.extend(parsed);
        }
        headers
    }

    /// Drives a future one wake-up at a time, so that a test can look at the log between two
    /// steps, where the future waits (for the disk, mostly) and nothing else polls it. It is
    /// polled again only once woken: glommio's I/O keeps a waker per poll until it completes.
    struct Stepper<F: Future> {
        future: Pin<Box<F>>,
        wake: Arc<StepWake>,
        polled: bool,
    }

    #[derive(Default)]
    struct StepWake {
        woken: AtomicBool,
        stepper: Mutex<Option<Waker>>,
    }

    impl Wake for StepWake {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.woken.store(true, Ordering::SeqCst);
            if let Some(waker) = self.stepper.lock().unwrap().take() {
                waker.wake();
            }
        }
    }

    impl<F: Future> Stepper<F> {
        fn new(future: F) -> Stepper<F> {
            Stepper { future: Box::pin(future), wake: Default::default(), polled: false }
        }

        /// Waits until the future was woken (not before its first step), polls it once, and
        /// returns its output if that completed it.
        async fn step(&mut self) -> Option<F::Output> {
            std::future::poll_fn(|cx| {
                if self.polled {
                    *self.wake.stepper.lock().unwrap() = Some(cx.waker().clone());
                    if !self.wake.woken.load(Ordering::SeqCst) {
                        return Poll::Pending;
                    }
                }
                self.polled = true;
                self.wake.woken.store(false, Ordering::SeqCst);
                let waker = Waker::from(self.wake.clone());
                let mut context = Context::from_waker(&waker);
                Poll::Ready(match self.future.as_mut().poll(&mut context) {
                    Poll::Ready(output) => Some(output),
                    Poll::Pending => None,
                })
            })
            .await
        }

        /// Steps the future to its end.
        async fn finish(mut self) -> F::Output {
            loop {
                if let Some(output) = self.step().await {
                    return output;
                }
            }
        }
    }

    #[test]
    fn offsets_are_stamped_in_place_unless_the_buffer_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            // Payloads of 64 KiB and more are eligible for stamping in place.
            let first = batch::build_for_tests(2, &[7u8; 40 << 10], 1000);
            let headers = batch::parse_all(&first).unwrap();
            let appended = log.append(Bytes::from(first.clone()), &headers).unwrap();
            assert_eq!(appended.base_offset, 0);

            // A unique buffer is stamped where it is: the batch kept is the caller's memory.
            let unique = Bytes::from(first.clone());
            let at = unique.as_ptr();
            let appended = log.append(unique, &headers).unwrap();
            assert_eq!(appended.batches[0].bytes.as_ptr(), at, "no copy");
            assert_eq!(batch::stored_header(&appended.batches[0].bytes).unwrap().base_offset, 2);

            // A buffer with much more room than its bytes is copied: it would pin that memory.
            let mut roomy = bytes::BytesMut::with_capacity(first.len() * 2);
            roomy.extend_from_slice(&first);
            let roomy = roomy.freeze();
            let at = roomy.as_ptr();
            let appended = log.append(roomy, &headers).unwrap();
            assert_ne!(appended.batches[0].bytes.as_ptr(), at);
            assert_eq!(batch::stored_header(&appended.batches[0].bytes).unwrap().base_offset, 4);

            // A shared buffer is copied, and the other holder's bytes are left as they were.
            let shared = Bytes::from(first.clone());
            let kept = shared.clone();
            let appended = log.append(shared, &headers).unwrap();
            assert_ne!(appended.batches[0].bytes.as_ptr(), kept.as_ptr());
            assert_eq!(batch::stored_header(&appended.batches[0].bytes).unwrap().base_offset, 6);
            assert_eq!(&kept[..], &first[..]);
            log.close().await.unwrap();
        });
    }

    /// A replicated batch as a leader stamped it: offsets from `base`, epoch `epoch`.
    fn leader_stamped(records: usize, base: i64, epoch: i32) -> Bytes {
        let mut bytes = batch::build_for_tests(records, b"replicated", 1000);
        batch::set_base_offset(&mut bytes, base);
        batch::set_leader_epoch(&mut bytes, epoch);
        Bytes::from(bytes)
    }

    #[test]
    fn stamped_batches_keep_their_offsets_and_epochs_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            let first = leader_stamped(3, 0, 4);
            let second = leader_stamped(2, 3, 5);
            let appended = log.append_stamped(&[first.clone(), second.clone()]).unwrap();
            assert_eq!((appended.base_offset, appended.next_offset), (0, 5));
            assert_eq!(appended.batches[1].bytes.as_ptr(), second.as_ptr(), "kept, not copied");
            log.flush().await.unwrap();

            // A gap, an overlap, a bad CRC and bytes after the batch are refused; nothing moves.
            let mut torn = leader_stamped(1, 5, 5).to_vec();
            let last = torn.len() - 1;
            torn[last] ^= 1;
            let mut trailing = leader_stamped(1, 5, 5).to_vec();
            trailing.push(0);
            for bad in
                [leader_stamped(1, 6, 5), leader_stamped(1, 4, 5), Bytes::from(torn), Bytes::from(trailing)]
            {
                assert!(log.append_stamped(&[bad]).is_err());
                assert_eq!(log.next_offset(), 5);
            }
            // All or nothing: a good batch followed by a bad one appends neither.
            assert!(log.append_stamped(&[leader_stamped(1, 5, 5), leader_stamped(1, 9, 5)]).is_err());
            assert_eq!(log.next_offset(), 5);
            log.close().await.unwrap();

            let log = Log::open(dir.path(), small_config()).await.unwrap();
            assert_eq!(log.next_offset(), 5);
            let stored = log.read(0, 1 << 20).await.unwrap().unwrap();
            assert_eq!(&stored[..first.len()], &first[..]);
            assert_eq!(&stored[first.len()..], &second[..]);
            log.close().await.unwrap();
        });
    }

    #[test]
    fn a_segment_rolls_before_its_offsets_outgrow_the_index() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            // Header-only batches claiming 2^31 - 1 records each (as a compressed batch may):
            // the fourth starts 3 * (2^31 - 1) offsets in, past what a u32 holds.
            let mut wide = batch::build_for_tests(1, b"", 0);
            wide[57..61].copy_from_slice(&i32::MAX.to_be_bytes()); // recordCount
            wide[23..27].copy_from_slice(&(i32::MAX - 1).to_be_bytes()); // lastOffsetDelta
            batch::reseal_for_tests(&mut wide);
            for _ in 0..4 {
                let headers = batch::parse_all(&wide).unwrap();
                log.append(Bytes::from(wide.clone()), &headers).unwrap();
            }
            log.flush().await.unwrap();
            assert_eq!(log.segment_count(), 2);
            let end = 4 * i64::from(i32::MAX);
            assert_eq!(log.durable_offset(), end);
            log.close().await.unwrap();
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            assert_eq!(log.next_offset(), end);
            assert_eq!(read_all(&log, 0).await.len(), 4);
        });
    }

    #[test]
    fn read_within_returns_nothing_larger_than_asked() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            let bytes = batch::build_for_tests(4, &[1u8; 1000], 0);
            let headers = batch::parse_all(&bytes).unwrap();
            log.append(Bytes::from(bytes), &headers).unwrap();
            log.flush().await.unwrap();
            assert!(log.read(0, 100).await.unwrap().is_some(), "read: one batch however large");
            assert!(log.read_within(0, 100).await.unwrap().is_none(), "read_within: only what fits");
            assert!(log.read_within(0, 8192).await.unwrap().is_some());
        });
    }

    #[test]
    fn offsets_are_contiguous_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            let ranges = fill(&log, 300, 3, 7).await;
            assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0));
            assert_eq!(log.durable_offset(), 900);
            assert!(log.segment_count() > 1, "16 KiB segments must roll");
            log.close().await.unwrap();

            let log = Log::open(dir.path(), small_config()).await.unwrap();
            assert_eq!(log.next_offset(), 900);
            let headers = read_all(&log, 0).await;
            assert_eq!(headers.len(), 300);
            assert!(headers.iter().enumerate().all(|(i, h)| h.base_offset == 3 * i as i64));
            let more = fill(&log, 1, 2, 1).await;
            assert_eq!(more, vec![(900, 902)]);
        });
    }

    #[test]
    fn a_flush_of_many_chunks_lands_whole() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { segment_bytes: 64 << 20, ..LogConfig::default() };
            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            // One unaligned batch first, so every chunk of the big flush rewrites a tail block.
            fill(&log, 1, 1, 1).await;
            let mut stored = Vec::new();
            for i in 0..48u8 {
                let bytes = batch::build_for_tests(8, &[i; 32 << 10], 2000 + i64::from(i));
                let headers = batch::parse_all(&bytes).unwrap();
                stored.extend(log.append(Bytes::from(bytes), &headers).unwrap().batches);
            }
            let flushed: usize = stored.iter().map(|b| b.bytes.len()).sum();
            assert!(flushed > 5 * WRITE_CHUNK_BYTES_MAX, "{flushed} bytes");
            assert_eq!(log.flush().await.unwrap(), 1 + 48 * 8);
            log.close().await.unwrap();

            let log = Log::open(dir.path(), config).await.unwrap();
            assert_eq!(log.next_offset(), 1 + 48 * 8, "recovery keeps every batch of the flush");
            for batch in &stored {
                let read = log.read(batch.header.base_offset, 1).await.unwrap().expect("stored");
                assert_eq!(
                    &read[..batch.bytes.len()],
                    &batch.bytes[..],
                    "batch at {}",
                    batch.header.base_offset
                );
            }
        });
    }

    #[test]
    fn a_read_ahead_never_answers_for_batches_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { segment_bytes: 4096, ..small_config() };
            let log = Log::open(dir.path(), config).await.unwrap();
            fill(&log, 200, 3, 10).await;
            assert!(log.segment_count() > 2);
            // Reads of at most 4 KiB each, every one after the first served by the read ahead.
            let headers = read_all(&log, 0).await;
            assert_eq!(headers.len(), 200);
            assert!(headers.iter().enumerate().all(|(i, h)| h.base_offset == 3 * i as i64));

            // Reading the next-to-last batch starts reading the last one ahead; the last one is
            // then truncated away (no segment removed) and replaced: the read must see the
            // new batch, not the one read ahead.
            let segments = log.segment_count();
            log.read(594, 1).await.unwrap().expect("batch 198");
            log.truncate_from(597).await.unwrap();
            assert_eq!(log.segment_count(), segments);
            assert!(log.read(597, 1).await.unwrap().is_none());
            let replacement = batch::build_for_tests(5, b"replacement", 5000);
            let headers = batch::parse_all(&replacement).unwrap();
            log.append(Bytes::from(replacement), &headers).unwrap();
            log.flush().await.unwrap();
            let read = log.read(597, 1).await.unwrap().expect("the new batch");
            let read = batch::parse_all(&read).unwrap();
            assert_eq!((read[0].base_offset, read[0].record_count, read[0].base_timestamp), (597, 5, 5000));
            log.close().await.unwrap();
        });
    }

    #[test]
    fn reads_during_a_flush_that_rolls_return_nothing_past_the_durable_offset() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 20, 1, 20).await;
            assert_eq!(log.segment_count(), 1);
            // One flush that fills the first segment and goes on in a second one: it publishes
            // the first segment's new size, then rolls, then writes the second segment, and
            // only then moves the durable offset.
            for i in 20..220 {
                let bytes = batch::build_for_tests(1, format!("value-{i:06}").as_bytes(), 1000 + i);
                let headers = batch::parse_all(&bytes).unwrap();
                log.append(Bytes::from(bytes), &headers).unwrap();
            }
            // The flush is driven here, one step at a time: between two steps it waits for the
            // disk, and nothing else runs it, so each check below sees the log exactly as a
            // reader would at that point of the flush.
            let mut flush = Stepper::new(log.flush());
            let mut steps_with_the_first_segment_ahead = 0;
            let flushed = loop {
                if let Some(flushed) = flush.step().await {
                    break flushed.unwrap();
                }
                let durable = log.durable_offset();
                let first = log.segments.borrow()[&0].clone();
                if first.next_offset.get() > durable {
                    steps_with_the_first_segment_ahead += 1;
                }
                if let Some(bytes) = log.read(0, 1 << 20).await.unwrap() {
                    let end = batch::parse_all(&bytes).unwrap().last().unwrap().next_offset();
                    assert!(end <= durable, "read batches up to {end} with the durable offset at {durable}");
                }
                let found = log.offset_for_timestamp(1000 + durable).await.unwrap();
                assert_eq!(found, None, "offset_for_timestamp found a batch past {durable}");
            };
            assert!(steps_with_the_first_segment_ahead > 0, "the flush must publish a size before it rolls");
            assert_eq!(flushed, 220);
            assert_eq!(log.segment_count(), 2);
            let headers = read_all(&log, 0).await;
            assert_eq!(headers.len(), 220, "everything is read once durable");
            log.close().await.unwrap();
        });
    }

    #[test]
    fn segments_above_the_largest_size_are_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = dir.path().join("log");
        run(async {
            let config = LogConfig { segment_bytes: SEGMENT_BYTES_MAX + 1, ..LogConfig::default() };
            let error = open_error(&log_dir, config).await;
            assert!(
                matches!(error, LogError::TooLarge { what: "segment_bytes", limit: SEGMENT_BYTES_MAX, .. }),
                "{error}"
            );
            assert!(!log_dir.exists(), "a refused configuration creates nothing");

            // The largest size is fine: every batch of such a segment starts at a u32 position.
            let config = LogConfig { segment_bytes: SEGMENT_BYTES_MAX, ..LogConfig::default() };
            let log = Log::open(&log_dir, config).await.unwrap();
            assert_eq!(fill(&log, 3, 2, 1).await, vec![(0, 2), (2, 4), (4, 6)]);
            log.close().await.unwrap();
        });
        let last_start = SEGMENT_BYTES_MAX - batch::HEADER_BYTES as u64;
        assert_eq!(u64::from(segment::position_u32(last_start)), last_start);
    }

    /// Runs `write_blocks` of a buffer of 3 blocks at block 1 over a device that writes at most
    /// `first_write_bytes` in its first write and all it is given after that, and fails a
    /// write that does not start on a block with EINVAL, as O_DIRECT does. Returns the
    /// result, the writes asked for (position, length) and what reached the device.
    async fn write_short(first_write_bytes: usize) -> (Result<()>, Vec<(u64, usize)>, Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short");
        let file = DmaFile::create(&path).await.unwrap();
        let total = 3 * BLOCK_BYTES as usize;
        let mut buffer = file.alloc_dma_buffer(total);
        for (i, byte) in buffer.as_bytes_mut().iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        let expected = buffer.as_bytes().to_vec();
        let device = RefCell::new(vec![0u8; 4 * BLOCK_BYTES as usize]);
        let calls = RefCell::new(Vec::new());
        let write = |buffer: Rc<DmaBuffer>, at: u64| {
            calls.borrow_mut().push((at, buffer.len()));
            let result = if !at.is_multiple_of(BLOCK_BYTES) {
                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                let len = if calls.borrow().len() == 1 { first_write_bytes } else { buffer.len() };
                let at = at as usize;
                device.borrow_mut()[at..at + len].copy_from_slice(&buffer.as_bytes()[..len]);
                Ok(len)
            };
            std::future::ready(result)
        };
        let result = write_blocks(&file, &path, buffer, BLOCK_BYTES, write).await;
        file.close().await.unwrap();
        let written = device.borrow()[BLOCK_BYTES as usize..].to_vec();
        (result, calls.into_inner(), written, expected)
    }

    #[test]
    fn a_short_write_goes_on_from_the_block_it_ended_in() {
        run(async {
            let block = BLOCK_BYTES as usize;
            // A block and a half: the rest starts again at the second block.
            let (result, calls, written, expected) = write_short(block + block / 2).await;
            result.unwrap();
            assert_eq!(calls, vec![(BLOCK_BYTES, 3 * block), (2 * BLOCK_BYTES, 2 * block)]);
            assert!(written == expected, "the device holds the whole buffer");

            // Whole blocks: the rest starts right after them.
            let (result, calls, written, expected) = write_short(2 * block).await;
            result.unwrap();
            assert_eq!(calls, vec![(BLOCK_BYTES, 3 * block), (3 * BLOCK_BYTES, block)]);
            assert!(written == expected);

            // Less than a block makes no progress: an error, not a loop.
            let (result, calls, _, _) = write_short(100).await;
            let error = result.unwrap_err();
            assert!(
                matches!(&error, LogError::Io { source, .. } if source.kind() == std::io::ErrorKind::WriteZero)
            );
            assert_eq!(calls.len(), 1, "{error}");
        });
    }

    /// Bytes the log's segments have read from disk.
    fn disk_bytes_read(log: &Log) -> u64 {
        log.segments.borrow().values().map(|s| s.disk_bytes_read.get()).sum()
    }

    #[test]
    fn a_reader_going_through_the_log_reads_each_byte_from_disk_once() {
        // Batches of ~220 KiB, for fetches of 300 KiB, with small ones between them (a
        // producer's linger cutting one short): each fetch stops before a batch it has
        // already read part of.
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config =
                LogConfig { segment_bytes: 4 << 20, index_interval_bytes: 64 << 10, ..LogConfig::default() };
            let log = Log::open(dir.path(), config).await.unwrap();
            let value = [7u8; 200];
            for i in 0..60 {
                let records = if i % 3 == 2 { 2 } else { 1050 };
                let bytes = batch::build_for_tests(records, &value, 1000 + i);
                let headers = batch::parse_all(&bytes).unwrap();
                log.append(Bytes::from(bytes), &headers).unwrap();
                if i % 4 == 3 {
                    log.flush().await.unwrap();
                }
            }
            log.flush().await.unwrap();
            assert!(log.segments.borrow().len() > 1, "the walk crosses a roll");
            let before = disk_bytes_read(&log);
            let max_bytes = 300 << 10;
            let (mut offset, mut reads) = (0, 0);
            while let Some(bytes) = log.read(offset, max_bytes).await.unwrap() {
                let headers = batch::parse_all(&bytes).unwrap();
                assert_eq!(headers[0].base_offset, offset, "reads go on where the last one ended");
                assert!(bytes.len() <= max_bytes);
                offset = headers.last().unwrap().next_offset();
                reads += 1;
            }
            assert_eq!(offset, log.next_offset(), "the walk reached the end");
            let stored = log.size_bytes();
            let read = disk_bytes_read(&log) - before;
            // Each read may start by reading again the block its predecessor ended in, and the
            // last read ahead reads past the end of what was asked.
            let bound = stored + reads * BLOCK_BYTES + (segment::READAHEAD_BYTES.max(max_bytes)) as u64;
            assert!(read <= bound, "{read} bytes read from disk for {stored} stored ({reads} reads)");
        });
    }

    #[test]
    fn two_readers_at_different_offsets_each_keep_their_read_ahead() {
        // Two consumers catching up on one partition, one from the start and one from the
        // middle, taking turns: each goes on with its own read ahead (with one per log, each
        // read dropped the other's, read on disk for nothing).
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            fill(&log, 40, 1050, 40).await;
            let before = disk_bytes_read(&log);
            let max_bytes = 64 << 10;
            let end = log.next_offset();
            let (mut first, mut second) = (0, 20 * 1050);
            let (mut first_reads, mut second_reads) = (0, 0);
            while first < end || second < end {
                for (offset, reads) in [(&mut first, &mut first_reads), (&mut second, &mut second_reads)] {
                    if *offset < end {
                        let bytes = log.read(*offset, max_bytes).await.unwrap().unwrap();
                        let headers = batch::parse_all(&bytes).unwrap();
                        assert_eq!(headers[0].base_offset, *offset);
                        *offset = headers.last().unwrap().next_offset();
                        *reads += 1;
                    }
                }
            }
            let stored = log.size_bytes();
            let read = disk_bytes_read(&log) - before;
            // The whole log once and its second half once, each read ahead ending with its
            // window past the last read.
            let bound =
                stored + stored / 2 + (first_reads + second_reads) * BLOCK_BYTES + 2 * max_bytes as u64;
            assert!(read <= bound, "{read} bytes read from disk for {stored} stored, {bound} at most");
            log.close().await.unwrap();
        });
    }

    #[test]
    fn a_read_ahead_that_held_the_old_end_of_the_log_reads_what_was_flushed_after_it() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
            let log = Log::open(dir.path(), config).await.unwrap();
            // Batches of 118 bytes: a read of 200 bytes returns one, having looked at the next
            // one's header. Each read ahead goes on with what the first read read: up to the
            // durable end, which falls inside a block.
            let one = 200;
            fill(&log, 30, 3, 30).await;
            for batch in 0..28 {
                log.read(3 * batch, one).await.unwrap().expect("an old batch");
            }
            assert_ne!(log.size_bytes() % BLOCK_BYTES, 0, "the old end is inside a block");
            fill(&log, 30, 3, 7).await;
            // Batch 28 comes from the read ahead, which held the old end; the read ahead of
            // batch 29 starts after the flush and looks past the old end, reading its block
            // again from its start (O_DIRECT reads start on a block).
            let mut offset = 84;
            while let Some(bytes) = log.read(offset, one).await.unwrap() {
                let headers = batch::parse_all(&bytes).expect("whole, checked batches");
                assert_eq!((headers.len(), headers[0].base_offset), (1, offset));
                offset = headers[0].next_offset();
            }
            assert_eq!(offset, 180, "every batch, old and new");
        });
    }

    #[test]
    fn a_read_that_a_truncation_overlapped_starts_no_read_ahead_over_the_removed_bytes() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
            let log = Log::open(dir.path(), config).await.unwrap();
            // 40 batches of 118 bytes: the read of the first one reads them all, more than a
            // block, which a read ahead going on from it would keep.
            fill(&log, 40, 3, 40).await;
            let mut reading = Stepper::new(log.read(0, 200));
            assert!(reading.step().await.is_none(), "the read waits for the disk");
            log.truncate_from(3).await.unwrap();
            // Other batches at the same offsets, past the old end.
            for i in 0..60 {
                let bytes = batch::build_for_tests(3, b"replacement", 5000 + i);
                let headers = batch::parse_all(&bytes).unwrap();
                log.append(Bytes::from(bytes), &headers).unwrap();
            }
            log.flush().await.unwrap();
            let first = reading.finish().await.unwrap().expect("batch 0");
            assert_eq!(batch::parse_all(&first).unwrap()[0].base_offset, 0);
            let next = log.read(3, 200).await.unwrap().expect("the batch now at 3");
            let next = batch::parse_all(&next).unwrap();
            assert_eq!((next[0].base_offset, next[0].base_timestamp), (3, 5000), "not the removed batch");
            log.close().await.unwrap();
        });
    }

    #[test]
    fn read_aheads_share_the_threads_read_ahead_bytes() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        run(async {
            // Reads of 4 MiB over five batches of just over 1 MiB: each read ahead reserves two reads'
            // worth, 8 MiB, so two fit in READ_AHEAD_BYTES_MAX (16 MiB) and the third does not.
            let max_bytes = 4 << 20;
            assert_eq!(READ_AHEAD_BYTES_MAX, 2 * READ_AHEAD_DEPTH * max_bytes);
            let value = vec![5u8; 1024];
            let mut logs = Vec::new();
            for dir in &dirs {
                let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
                for i in 0..5 {
                    let bytes = batch::build_for_tests(1020, &value, i);
                    let headers = batch::parse_all(&bytes).unwrap();
                    log.append(Bytes::from(bytes), &headers).unwrap();
                }
                log.flush().await.unwrap();
                logs.push(log);
            }
            let reading_ahead =
                |logs: &[Log]| logs.iter().map(|l| !l.read_aheads.borrow().is_empty()).collect::<Vec<_>>();
            for log in &logs {
                let read = log.read(0, max_bytes).await.unwrap().unwrap();
                assert_eq!(batch::parse_all(&read).unwrap().len(), 3);
            }
            assert_eq!(reading_ahead(&logs), [true, true, false]);
            assert_eq!(READ_AHEAD_BYTES.with(Cell::get), READ_AHEAD_BYTES_MAX);

            // The first reader takes the rest: its read ahead has nothing more to read and
            // gives its share back; the third reader's next read starts one.
            let read = logs[0].read(3060, max_bytes).await.unwrap().unwrap();
            assert_eq!(batch::parse_all(&read).unwrap()[0].base_offset, 3060, "from the read ahead");
            assert_eq!(reading_ahead(&logs), [false, true, false]);
            logs[2].read(0, max_bytes).await.unwrap().unwrap();
            assert_eq!(reading_ahead(&logs), [false, true, true]);

            // A reader that went away: its read ahead stays until another reader needs its
            // share and it has been idle for READ_AHEAD_IDLE.
            logs[0].read(0, max_bytes).await.unwrap().unwrap();
            assert_eq!(reading_ahead(&logs), [false, true, true], "the others are not idle yet");
            glommio::timer::sleep(READ_AHEAD_IDLE).await;
            logs[0].read(0, max_bytes).await.unwrap().unwrap();
            assert_eq!(reading_ahead(&logs), [true, false, false], "both idle ones were dropped");

            // A closed log gives its share back.
            for log in logs {
                log.close().await.unwrap();
            }
            assert_eq!(READ_AHEAD_BYTES.with(Cell::get), 0);
        });
    }

    #[test]
    fn a_read_waiting_when_its_log_is_closed_ends_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 10, 3, 10).await;
            let mut reading = Stepper::new(log.read(0, 200));
            assert!(reading.step().await.is_none(), "the read waits for the disk");
            log.close().await.unwrap();
            let read = reading.finish().await;
            assert!(matches!(read, Err(LogError::Closed { .. })), "{read:?}");
        });
    }

    #[test]
    fn a_read_inside_a_batch_returns_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 10, 5, 10).await;
            let bytes = log.read(23, 1).await.unwrap().unwrap();
            let headers = batch::parse_all(&bytes).unwrap();
            assert_eq!(headers.len(), 1, "max_bytes below one batch still returns one");
            assert_eq!(headers[0].base_offset, 20);
            assert!(log.read(50, 1).await.unwrap().is_none());
            assert!(matches!(log.read(51, 1).await, Err(LogError::OffsetOutOfRange { .. })));
        });
    }

    #[test]
    fn recovery_cuts_a_torn_tail_and_keeps_everything_before_it() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            fill(&log, 20, 2, 3).await;
            let good_size = log.size_bytes();
            log.close().await.unwrap();

            // A torn write: half of a valid batch after the last good one.
            let path = dir.path().join(segment::log_file_name(0));
            let mut file = std::fs::read(&path).unwrap();
            file.truncate(good_size as usize);
            let mut next = batch::build_for_tests(2, b"torn", 1);
            batch::set_base_offset(&mut next, 40);
            file.extend_from_slice(&next[..next.len() / 2]);
            std::fs::write(&path, &file).unwrap();

            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            assert_eq!(log.next_offset(), 40);
            assert_eq!(log.size_bytes(), good_size);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), good_size);
            assert_eq!(read_all(&log, 0).await.len(), 20);
            assert_eq!(fill(&log, 1, 1, 1).await, vec![(40, 41)]);
        });
    }

    /// A small flush leaves zeros written past the segment's end (so the next flushes write
    /// inside written blocks); nothing reads them, and an open, a truncation and a seal cut
    /// them off. A large flush writes none.
    #[test]
    fn zeros_written_ahead_are_cut_off_and_never_read() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { segment_bytes: 4 << 20, ..small_config() };
            let path = dir.path().join(segment::log_file_name(0));
            let file_len = || std::fs::metadata(&path).unwrap().len();
            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            fill(&log, 10, 1, 1).await;
            let size = log.size_bytes();
            assert!(file_len() >= size + ZERO_AHEAD_BYTES as u64 / 2, "{} of {size}", file_len());
            let bytes = std::fs::read(&path).unwrap();
            assert!(bytes[size as usize..].iter().all(|b| *b == 0), "zeros past the end");
            assert_eq!(read_all(&log, 0).await.len(), 10);
            // A crash: the file keeps its zeros, and the open cuts them off.
            drop(log);
            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            assert_eq!((log.next_offset(), log.size_bytes(), file_len()), (10, size, size));
            fill(&log, 5, 1, 1).await;
            assert!(file_len() > log.size_bytes(), "zeroing ahead again");
            log.truncate_from(12).await.unwrap();
            assert_eq!(file_len(), log.size_bytes(), "a truncation cuts the zeros");
            assert_eq!(read_all(&log, 0).await.len(), 12);
            // A large flush, past the zeros, writes none of its own; a seal cuts the file to
            // its batches.
            let large = batch::build_for_tests(1, &vec![7u8; 2 * ZERO_AHEAD_FLUSH_BYTES_MAX as usize], 0);
            let headers = batch::parse_all(&large).unwrap();
            log.append(Bytes::from(large), &headers).unwrap();
            log.flush().await.unwrap();
            let size = log.size_bytes();
            assert_eq!(file_len(), segment::align_up(size), "no zeros after a large flush");
            log.close().await.unwrap();
            let config = LogConfig { segment_bytes: 128 << 10, ..config };
            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            fill(&log, 1, 1, 1).await;
            assert_eq!(log.segment_count(), 2, "rolled past the smaller segment size");
            assert_eq!(file_len(), size, "sealed: its batches and no more");
            drop(log);
            let log = Log::open(dir.path(), config).await.unwrap();
            assert_eq!(read_all(&log, 0).await.len(), 14);
        });
    }

    #[test]
    fn recovery_stops_at_a_batch_with_a_bad_crc() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            fill(&log, 10, 1, 10).await;
            let first_batch = batch::build_for_tests(1, b"value-000000", 0).len();
            log.close().await.unwrap();

            let path = dir.path().join(segment::log_file_name(0));
            let mut file = std::fs::read(&path).unwrap();
            file[5 * first_batch + 70] ^= 0xff; // inside batch 5's records
            std::fs::write(&path, &file).unwrap();

            let log = Log::open(dir.path(), config).await.unwrap();
            assert_eq!(log.next_offset(), 5);
            assert_eq!(read_all(&log, 0).await.len(), 5);
        });
    }

    #[test]
    fn a_durable_batch_damaged_after_open_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
            let log = Log::open(dir.path(), config).await.unwrap();
            fill(&log, 10, 1, 10).await;
            let first_batch = batch::build_for_tests(1, b"value-000000", 0).len();
            // Bit rot under a running log: batch 3's length field now claims 2 GiB.
            let path = dir.path().join(segment::log_file_name(0));
            let mut file = std::fs::read(&path).unwrap();
            file[3 * first_batch + 8..3 * first_batch + 12].copy_from_slice(&i32::MAX.to_be_bytes());
            std::fs::write(&path, &file).unwrap();
            let error = log.read(0, 1 << 20).await.unwrap_err();
            assert!(matches!(error, LogError::CorruptBatch { .. }), "{error}");
            assert!(log.read(5, 10).await.is_err());
        });
    }

    /// The error of an open that must fail.
    async fn open_error(dir: &Path, config: LogConfig) -> LogError {
        match Log::open(dir, config).await {
            Ok(_) => panic!("the open of {} must fail", dir.display()),
            Err(error) => error,
        }
    }

    /// Every file of the log directory with its bytes.
    fn files_of(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .map(|path| (path.clone(), std::fs::read(path).unwrap()))
            .collect()
    }

    #[test]
    fn a_bad_batch_in_a_sealed_segment_fails_the_open_and_changes_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let first_batch = batch::build_for_tests(1, b"value-000000", 0).len();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 600, 1, 10).await;
            assert!(log.segment_count() > 2);
            log.close().await.unwrap();
        });
        // Without its index the sealed first segment is checked from its first batch on.
        std::fs::remove_file(dir.path().join(segment::index_file_name(0))).unwrap();
        let path = dir.path().join(segment::log_file_name(0));
        let mut file = std::fs::read(&path).unwrap();
        file[5 * first_batch + 70] ^= 0xff; // inside batch 5's records
        std::fs::write(&path, &file).unwrap();
        let before = files_of(dir.path());

        let error = run(open_error(dir.path(), small_config()));
        assert!(matches!(error, LogError::CorruptBatch { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(&format!("byte {}", 5 * first_batch)), "{message}");
        assert!(message.contains("CRC"), "{message}");
        assert!(files_of(dir.path()) == before, "no file may change: {message}");
    }

    #[test]
    fn a_sealed_segment_that_starts_at_the_wrong_offset_fails_the_open_and_changes_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let second = run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 600, 1, 10).await;
            assert!(log.segment_count() > 2);
            let second = *log.segments.borrow().keys().nth(1).unwrap();
            log.close().await.unwrap();
            second
        });
        // The sealed second segment's first batch claims another offset than the file's name
        // (baseOffset lies outside the CRC); without its index the open checks that batch.
        std::fs::remove_file(dir.path().join(segment::index_file_name(second))).unwrap();
        let path = dir.path().join(segment::log_file_name(second));
        let mut file = std::fs::read(&path).unwrap();
        batch::set_base_offset(&mut file, second + 1);
        std::fs::write(&path, &file).unwrap();
        let before = files_of(dir.path());

        let error = run(open_error(dir.path(), small_config()));
        assert!(matches!(error, LogError::CorruptBatch { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("byte 0:"), "{message}");
        assert!(files_of(dir.path()) == before, "no file may change: {message}");
    }

    #[test]
    fn a_missing_segment_fails_the_open_before_the_last_segment_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (second, last) = run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 600, 1, 10).await;
            assert!(log.segment_count() > 2);
            let second = *log.segments.borrow().keys().nth(1).unwrap();
            let last = log.active_segment().base_offset;
            log.close().await.unwrap();
            (second, last)
        });
        std::fs::remove_file(dir.path().join(segment::log_file_name(second))).unwrap();
        std::fs::remove_file(dir.path().join(segment::index_file_name(second))).unwrap();
        // A torn tail on the last segment, which an open that succeeds would cut.
        let path = dir.path().join(segment::log_file_name(last));
        let mut file = std::fs::read(&path).unwrap();
        file.extend_from_slice(&[0xab; 100]);
        std::fs::write(&path, &file).unwrap();
        let before = files_of(dir.path());

        let error = run(open_error(dir.path(), small_config()));
        assert!(matches!(error, LogError::CorruptBatch { .. }), "{error}");
        assert!(error.to_string().contains(&format!("starts at {last}")), "{error}");
        assert!(files_of(dir.path()) == before, "no file may change: {error}");
    }

    #[test]
    fn damaged_index_files_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 600, 1, 5).await;
            log.close().await.unwrap();
            let index = dir.path().join(segment::index_file_name(0));
            assert!(index.exists(), "a sealed segment has an index");
            std::fs::write(&index, b"garbage").unwrap();
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            assert_eq!(log.next_offset(), 600);
            let headers = read_all(&log, 137).await;
            assert_eq!(headers.first().unwrap().base_offset, 137);
            assert_eq!(headers.len(), 463);
        });
    }

    #[test]
    fn truncate_from_removes_the_suffix_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 300, 2, 10).await;
            let segments_before = log.segment_count();
            log.truncate_from(100).await.unwrap();
            assert!(log.segment_count() < segments_before);
            assert_eq!(log.next_offset(), 100);
            assert!(log.truncate_from(51).await.is_err(), "51 is inside a batch");
            assert_eq!(fill(&log, 1, 2, 1).await, vec![(100, 102)]);
            log.close().await.unwrap();
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            assert_eq!(log.next_offset(), 102);
            assert_eq!(read_all(&log, 0).await.len(), 51);
        });
    }

    #[test]
    fn a_truncation_that_fails_after_changing_files_stops_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let bases: Vec<i64> = run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 800, 1, 10).await;
            let bases: Vec<i64> = log.segments.borrow().keys().copied().collect();
            assert!(bases.len() >= 4, "{bases:?}");
            // A later segment's file is gone behind the log's back: deleting it fails, after
            // the newer ones were deleted already.
            std::fs::remove_file(dir.path().join(segment::log_file_name(bases[2]))).unwrap();
            let error = log.truncate_from(100).await.unwrap_err();
            assert!(matches!(error, LogError::Io { op: "deleting segment", .. }), "{error}");
            let stopped = log.stopped().expect("the log stopped");
            assert!(stopped.contains("truncation from offset 100"), "{stopped}");

            let bytes = batch::build_for_tests(1, b"after", 5000);
            let headers = batch::parse_all(&bytes).unwrap();
            let appended = log.append(Bytes::from(bytes), &headers);
            assert!(matches!(appended, Err(LogError::Stopped { .. })), "{appended:?}");
            assert!(matches!(log.flush().await, Err(LogError::Stopped { .. })));
            assert!(matches!(log.truncate_from(50).await, Err(LogError::Stopped { .. })));
            // Reads see the truncated log: nothing at or after 100.
            let headers = read_all(&log, 0).await;
            assert_eq!(headers.last().unwrap().next_offset(), 100);
            bases
        });
        // What is left on disk still opens: the first segments, uncut, continuing one another.
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            assert_eq!(log.segment_count(), 2);
            assert_eq!(log.next_offset(), bases[2]);
            assert_eq!(read_all(&log, 0).await.len() as i64, bases[2]);
        });
    }

    #[test]
    fn a_truncation_cuts_the_kept_segment_only_after_the_deletions_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment::log_file_name(0));
        let (bases, kept_bytes) = run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 800, 1, 10).await;
            let bases: Vec<i64> = log.segments.borrow().keys().copied().collect();
            assert!(bases.len() >= 3, "{bases:?}");
            let kept_bytes = std::fs::read(&path).unwrap();
            // The directory fsync after the deletions fails (a crash at that point): the cut of
            // the kept segment must not have happened.
            DIRECTORY_SYNC_FAILS.with(|fails| fails.set(true));
            let error = log.truncate_from(100).await.unwrap_err();
            DIRECTORY_SYNC_FAILS.with(|fails| fails.set(false));
            assert!(matches!(error, LogError::Io { op: "fsync of directory", .. }), "{error}");
            assert!(log.stopped().is_some());
            (bases, kept_bytes)
        });
        assert!(std::fs::read(&path).unwrap() == kept_bytes, "the kept segment was cut");
        for base in &bases[1..] {
            assert!(!dir.path().join(segment::log_file_name(*base)).exists());
        }
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            assert_eq!(log.next_offset(), bases[1]);
        });
    }

    #[test]
    fn a_truncation_keeps_the_largest_timestamp_of_the_batches_it_keeps() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            // One segment, a time index entry every dozen batches or so.
            let config = LogConfig { segment_bytes: 1 << 20, ..small_config() };
            let log = Log::open(dir.path(), config).await.unwrap();
            fill(&log, 300, 1, 10).await; // batch i has timestamp 1000 + i
            assert_eq!(log.segment_count(), 1);
            for offset in (1..300).rev().step_by(7) {
                log.truncate_from(offset).await.unwrap();
                assert_eq!(log.max_timestamp(), Some(999 + offset), "after truncation from {offset}");
                let found = log.offset_for_timestamp(999 + offset).await.unwrap();
                assert_eq!(found, Some(offset - 1), "after truncation from {offset}");
            }
            log.truncate_from(0).await.unwrap();
            assert_eq!(log.max_timestamp(), None);
            // The time index goes on from the kept state as if built by the appends alone.
            fill(&log, 50, 1, 10).await;
            assert_eq!(log.max_timestamp(), Some(1049));
            assert_eq!(log.offset_for_timestamp(1030).await.unwrap(), Some(30));
        });
    }

    fn is_busy<T>(result: &Result<T>) -> bool {
        matches!(result, Err(LogError::Io { source, .. }) if source.kind() == std::io::ErrorKind::ResourceBusy)
    }

    fn one_batch(records: usize) -> (Bytes, Vec<BatchHeader>) {
        let bytes = batch::build_for_tests(records, b"one", 7000);
        let headers = batch::parse_all(&bytes).unwrap();
        (Bytes::from(bytes), headers)
    }

    #[test]
    fn a_truncation_is_refused_while_a_flush_runs() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 100, 1, 10).await;
            let (bytes, headers) = one_batch(2);
            log.append(bytes, &headers).unwrap();
            let mut flush = Stepper::new(log.flush());
            assert!(flush.step().await.is_none(), "the flush waits for the disk");
            assert!(log.is_flushing());

            let refused = log.truncate_from(50).await;
            assert!(is_busy(&refused), "{refused:?}");
            assert_eq!(log.next_offset(), 102, "a refused truncation changes nothing");
            assert!(log.stopped().is_none());
            assert_eq!(flush.finish().await.unwrap(), 102);

            log.truncate_from(50).await.unwrap();
            assert_eq!(log.next_offset(), 50);
            log.close().await.unwrap();
        });
    }

    #[test]
    fn appends_flushes_and_truncations_are_refused_while_a_truncation_runs() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 300, 1, 10).await;
            // Pending batches: the truncation flushes them first, and waits for the disk.
            let (bytes, headers) = one_batch(2);
            log.append(bytes, &headers).unwrap();
            let mut truncation = Stepper::new(log.truncate_from(100));
            assert!(truncation.step().await.is_none(), "the truncation waits for the disk");

            let (bytes, headers) = one_batch(3);
            assert!(is_busy(&log.append(bytes, &headers)), "an append during a truncation");
            assert!(is_busy(&log.flush().await), "a flush during a truncation");
            assert!(is_busy(&log.truncate_from(200).await), "a second truncation");
            truncation.finish().await.unwrap();

            assert!(log.stopped().is_none());
            assert_eq!(log.next_offset(), 100);
            assert_eq!(fill(&log, 1, 3, 1).await, vec![(100, 103)]);
            log.close().await.unwrap();
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            let headers = read_all(&log, 0).await;
            assert_eq!(headers.len(), 101);
            assert!(headers.windows(2).all(|w| w[0].next_offset() == w[1].base_offset));
        });
    }

    #[test]
    fn a_truncation_cancelled_while_it_changes_the_log_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 800, 1, 10).await;
            assert!(log.segment_count() > 2);
            // Driven until it has lowered the log's offsets (it then deletes files and waits for
            // the directory fsync), then dropped.
            let mut truncation = Stepper::new(log.truncate_from(100));
            while log.next_offset() != 100 {
                assert!(truncation.step().await.is_none(), "the truncation waits for the disk");
            }
            drop(truncation);
            let stopped = log.stopped().expect("a cancelled truncation stops the log");
            assert!(stopped.contains("cancelled"), "{stopped}");
            let (bytes, headers) = one_batch(1);
            assert!(matches!(log.append(bytes, &headers), Err(LogError::Stopped { .. })));
        });
    }

    #[test]
    fn a_truncation_cancelled_during_its_flush_stops_the_log_and_retention_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { retention_bytes: Some(1), ..small_config() };
            let log = Log::open(dir.path(), config).await.unwrap();
            fill(&log, 800, 1, 10).await;
            let segments = log.segment_count();
            assert!(segments > 2);
            let (bytes, headers) = one_batch(2);
            log.append(bytes, &headers).unwrap();
            let mut truncation = Stepper::new(log.truncate_from(100));
            assert!(truncation.step().await.is_none(), "the truncation waits for its flush");
            assert_eq!(log.apply_retention(0).unwrap(), 0, "no retention during a truncation");
            assert_eq!(log.segment_count(), segments);
            drop(truncation);
            let stopped = log.stopped().expect("a truncation cancelled in its flush stops the log");
            assert!(stopped.contains("during its flush"), "{stopped}");
            // Refused plainly from now on, no overlapping-flush panic.
            assert!(matches!(log.flush().await, Err(LogError::Stopped { .. })));
            assert!(matches!(log.truncate_from(100).await, Err(LogError::Stopped { .. })));
        });
    }

    #[test]
    fn retention_deletes_whole_closed_segments() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { retention_bytes: Some(40 << 10), ..small_config() };
            let log = Log::open(dir.path(), config).await.unwrap();
            fill(&log, 1000, 1, 50).await;
            let removed = log.apply_retention(0).unwrap();
            assert!(removed > 0);
            assert!(log.size_bytes() >= 40 << 10);
            assert!(log.log_start_offset() > 0);
            assert!(matches!(log.read(0, 100).await, Err(LogError::OffsetOutOfRange { .. })));
            let first = read_all(&log, log.log_start_offset()).await;
            assert_eq!(first.first().unwrap().base_offset, log.log_start_offset());
            assert_eq!(first.last().unwrap().next_offset(), 1000);
        });
    }

    #[test]
    fn retention_below_a_bound_keeps_what_reaches_past_it() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let config = LogConfig { retention_bytes: Some(1), ..small_config() };
            let log = Log::open(dir.path(), config).await.unwrap();
            fill(&log, 1000, 1, 50).await;
            let unbounded = log.retention_start(0, i64::MAX).expect("closed segments to delete");
            let bounded = log.retention_start(0, 500).expect("segments ending by 500");
            assert!(bounded <= 500 && bounded < unbounded, "{bounded} {unbounded}");
            assert_eq!(log.retention_start(0, 0), None, "no segment ends by 0");
            assert_eq!(log.log_start_offset(), 0, "asking deletes nothing");
            log.remove_segments_before(bounded).unwrap();
            assert_eq!(log.log_start_offset(), bounded);
        });
    }

    #[test]
    fn the_start_below_a_bound_ignores_retention_and_keeps_the_open_segment() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 1000, 1, 50).await;
            assert_eq!(log.retention_start(0, i64::MAX), None, "no retention is configured");
            let below = log.start_below(500).expect("segments ending by 500");
            assert!(below > 0 && below <= 500, "{below}");
            let all = log.start_below(i64::MAX).expect("every closed segment");
            assert!(all > below && all < 1000, "the open segment stays: {all}");
            assert_eq!(log.start_below(0), None, "no segment ends by 0");
            log.remove_segments_before(below).unwrap();
            assert_eq!(log.log_start_offset(), below);
            assert_eq!(log.start_below(below), None, "nothing more ends by the new start");
        });
    }

    /// While a fresh start waits for the disk the log holds no segment: reads then find it
    /// empty at the new start (a replica's catch-up read panicked here, in a cluster test).
    #[test]
    fn a_read_while_the_log_starts_afresh_finds_it_empty() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 300, 1, 10).await;
            let mut reset = Stepper::new(log.start_at(5_000));
            assert!(reset.step().await.is_none(), "the fresh start waits for the disk");
            assert_eq!((log.log_start_offset(), log.next_offset()), (5_000, 5_000));
            assert_eq!(log.recent_start_offset(1 << 20), 5_000);
            assert!(matches!(log.read(10, 100).await, Err(LogError::OffsetOutOfRange { .. })));
            assert!(log.read(5_000, 100).await.unwrap().is_none());
            reset.finish().await.unwrap();
            assert_eq!(log.log_start_offset(), 5_000);
        });
    }

    #[test]
    fn a_log_started_afresh_holds_nothing_below_its_start_and_takes_appends_there() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 300, 1, 10).await; // several segments
            assert!(log.segment_count() > 1);
            log.append_stamped(&[leader_stamped(1, 300, 1)]).unwrap(); // pending, never flushed: dropped
            log.start_at(5_000).await.unwrap();
            assert_eq!(
                (log.log_start_offset(), log.next_offset(), log.durable_offset()),
                (5_000, 5_000, 5_000)
            );
            assert_eq!(log.segment_count(), 1);
            assert!(matches!(log.read(10, 100).await, Err(LogError::OffsetOutOfRange { .. })));
            log.append_stamped(&[leader_stamped(3, 5_000, 4), leader_stamped(2, 5_003, 4)]).unwrap();
            log.flush().await.unwrap();
            log.close().await.unwrap();
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            assert_eq!((log.log_start_offset(), log.next_offset()), (5_000, 5_005));
            let read: Vec<i64> = read_all(&log, 5_000).await.iter().map(|h| h.base_offset).collect();
            assert_eq!(read, [5_000, 5_003]);
            let files = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).count();
            assert!(files <= 3, "the old segments are gone: {files} files");
        });
    }

    #[test]
    fn timestamps_find_the_first_batch_at_or_after() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            fill(&log, 300, 1, 10).await; // batch i has timestamp 1000 + i
            assert_eq!(log.offset_for_timestamp(0).await.unwrap(), Some(0));
            assert_eq!(log.offset_for_timestamp(1150).await.unwrap(), Some(150));
            assert_eq!(log.offset_for_timestamp(1299).await.unwrap(), Some(299));
            assert_eq!(log.offset_for_timestamp(1300).await.unwrap(), None);
        });
    }
}
