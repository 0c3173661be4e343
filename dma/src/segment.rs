//! One segment: an append-only file of record batches, named by the offset of its first batch.
//!
//! Files are opened with O_DIRECT (glommio's `DmaFile`), so every write starts and ends on a
//! 4 KiB boundary. The writer keeps the last partial block of the segment in memory (the *tail*)
//! and rewrites it, followed by the new batches, on the next flush; the bytes past the logical
//! end of the last block are zeros. A zero `batchLength` therefore ends a scan, exactly like a
//! torn or unwritten tail does.
//!
//! Invariants:
//! - `size` is the number of bytes of whole, checked, fdatasync'ed batches; readers never read past it.
//! - batches are contiguous from position 0 and their offsets are contiguous from `base_offset`.
//! - a segment lives on the shard that owns its partition; it is never shared across threads.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaFile, OpenOptions, ReadResult};

use crate::batch::{self, BatchHeader, LOG_OVERHEAD_BYTES};
use crate::index::SegmentIndex;
use crate::{LogError, Result};

/// O_DIRECT alignment of positions and lengths.
pub const BLOCK_BYTES: u64 = 4096;
/// The largest single write a flush issues: 2 MiB, one block of the daemon's global allocator
/// (`huge::DmaAllocator`: a huge page, kept for reuse once freed, so a chunk neither faults
/// nor zeroes memory again). A full chunk does not fit the memory a shard registers with
/// io_uring (`--io-memory-bytes`, 1 MiB by default) and comes from that allocator; a smaller
/// write's buffer may still come from the registered memory. It was 512 KiB, half that
/// memory, from when a chunk too large for it came fresh from the heap every time (its page
/// faults, zeroing and unmapping stalled the shard about 1 ms per cached-mode flush). Measured
/// against 512 KiB, runs interleaved (bench/RESULTS.md, session 19): RF 3 acks=all max
/// 467-481k against 349-427k msg/s, single-node sync produce of 1 KiB 1.53-1.54M against
/// 1.17-1.20M msg/s, the cached-mode 20k msg/s p99 the same. fio here writes fastest in
/// 4 MiB writes; 2 MiB keeps a chunk within one huge page.
///
/// Reads: a read's first window (a fetch's size, 1 MiB for most consumers) does not fit the
/// registered memory either and comes from the same allocator; its smaller extensions may
/// use registered memory while the read runs, and what a read ahead keeps past its result is
/// copied to the heap (`FileWindow::into_held`), so no reader pins that memory while it waits.
pub const WRITE_CHUNK_BYTES_MAX: usize = 2 << 20;
/// How much a small flush zeroes ahead of the segment's end, written beside its batches.
/// An fdatasync after a write that grows the file also commits the file's new size and
/// blocks through the filesystem's journal; after a write into blocks already written it
/// flushes the device cache alone. Measured with fio here (18 writers of 16 KiB, fdatasync
/// after each): p99 2.8-4.8 ms appending, 3.2-5.1 ms into fallocated (unwritten) blocks,
/// 0.95-1.27 ms overwriting. So a flush of a few KiB keeps the next ones inside written
/// blocks: one journal commit per this many bytes instead of one per flush.
pub const ZERO_AHEAD_BYTES: usize = 512 << 10;
/// A flush of at most this many bytes writes its batches through the segment's O_DSYNC
/// descriptor instead of writing and then fdatasyncing (`Log::write_segment`). Measured with
/// `scripts/bench-cluster.sh 10`, runs interleaved: at RF 3 20k msg/s (flushes of ~9 KiB)
/// the produce p99 fell from 3.2-4.6 ms to 2.5-3.0 ms, the nodes' flush p99 from 1.6-2.5 to
/// 1.3-1.5 ms and their system CPU by a fifth; at half the RF 3 maximum (flushes of tens to
/// hundreds of KiB) the produce p99 rose from 7-14 to 15-30 ms with every flush up to 128 KiB
/// written so (replication lag p99 3.6-7 to 7-20 ms), so the limit stays where the
/// latency-bound flushes are: 32 KiB missed the 3 ms p99 again, 64 and 128 KiB met it.
pub const DSYNC_FLUSH_BYTES_MAX: u64 = 64 << 10;
/// Only a flush of at most this many bytes zeroes ahead: a larger one spreads its journal
/// commit over its bytes, and zeroes would double what a busy disk writes.
pub const ZERO_AHEAD_FLUSH_BYTES_MAX: u64 = 128 << 10;
/// How much the scan of a segment at open reads at a time.
pub const SCAN_READ_BYTES: usize = 512 << 10;
/// How far a reader reads ahead of what it was asked for.
pub const READAHEAD_BYTES: usize = 256 << 10;
/// The largest segment size a log can be configured with (4 GiB). Positions inside a segment
/// are `u32` (index entries, in memory and on disk), and every batch but a segment's first
/// starts before the configured size, so every position fits below this.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 32;
/// How far after its base offset a segment's last batch may start: index entries keep
/// offsets relative to the base as `u32`. The log rolls a segment before that.
pub const SEGMENT_OFFSET_SPAN_MAX: i64 = u32::MAX as i64;

pub(crate) fn align_down(position: u64) -> u64 {
    position & !(BLOCK_BYTES - 1)
}

pub(crate) fn align_up(position: u64) -> u64 {
    align_down(position + BLOCK_BYTES - 1)
}

pub(crate) fn log_file_name(base_offset: i64) -> String {
    format!("{base_offset:020}.log")
}

pub(crate) fn index_file_name(base_offset: i64) -> String {
    format!("{base_offset:020}.index")
}

pub(crate) struct Segment {
    pub base_offset: i64,
    pub path: PathBuf,
    pub file: Rc<DmaFile>,
    /// The same file opened with O_DSYNC, for small flushes (see `Segment::dsync_file`).
    dsync_file: RefCell<Option<Rc<DmaFile>>>,
    /// Durable bytes (see the module invariants).
    pub size: Cell<u64>,
    /// The offset after the last durable batch.
    pub next_offset: Cell<i64>,
    pub index: RefCell<SegmentIndex>,
    /// Bytes readers (fetches, lookups, recovery) read from the file.
    pub disk_bytes_read: Cell<u64>,
    /// The file's blocks up to here are written (batches, or zeros a flush wrote ahead of
    /// them: see [`ZERO_AHEAD_BYTES`]); at least `size`. Zeros past `size` end a scan like
    /// a torn tail, and are cut off at an open, a truncation and a seal.
    pub zeroed_end: Cell<u64>,
}

impl Segment {
    pub async fn create(dir: &Path, base_offset: i64, index_interval_bytes: u32) -> Result<Segment> {
        Segment::open_file(dir, base_offset, index_interval_bytes, true).await
    }

    /// Opens (or, with `create`, creates) the segment file; the segment starts out empty and
    /// unindexed.
    async fn open_file(
        dir: &Path,
        base_offset: i64,
        index_interval_bytes: u32,
        create: bool,
    ) -> Result<Segment> {
        let path = dir.join(log_file_name(base_offset));
        let file =
            OpenOptions::new().read(true).write(true).create_new(create).dma_open(&path).await.map_err(
                |e| LogError::io(if create { "creating segment" } else { "opening segment" }, &path, e),
            )?;
        Ok(Segment {
            base_offset,
            path,
            file: Rc::new(file),
            dsync_file: RefCell::new(None),
            size: Cell::new(0),
            next_offset: Cell::new(base_offset),
            index: RefCell::new(SegmentIndex::new(base_offset, index_interval_bytes)),
            disk_bytes_read: Cell::new(0),
            zeroed_end: Cell::new(0),
        })
    }

    /// Opens an existing segment and finds its end by checking its batches; a sealed segment's
    /// sound index lets the check start at its last entry.
    ///
    /// Only the last segment (not `sealed`) can hold a torn write: anything after its last good
    /// batch (a torn write, zeros, stale bytes) is cut off the file. A sealed segment was
    /// complete and fdatasync'ed before the next one was created, so a bad batch in it, or a
    /// first batch that is not the one its name says, is damage: the open fails with an error
    /// naming the file and the byte, and the file is left exactly as it is.
    pub async fn open(
        dir: &Path,
        base_offset: i64,
        index_interval_bytes: u32,
        sealed: bool,
    ) -> Result<Segment> {
        let segment = Segment::open_file(dir, base_offset, index_interval_bytes, false).await?;
        let file_bytes =
            segment.file.file_size().await.map_err(|e| LogError::io("sizing segment", &segment.path, e))?;
        let persisted = if sealed {
            let index_path = dir.join(index_file_name(base_offset));
            std::fs::read(&index_path)
                .ok()
                .and_then(|bytes| SegmentIndex::decode(&bytes, base_offset, index_interval_bytes, file_bytes))
        } else {
            None
        };
        // A sound index lets the scan start at its last entry (which it already covers); the scan
        // still checks every batch from there on, which is how the end of the segment is found.
        let (scan_position, scan_offset, indexed_below) = match persisted {
            Some(index) => {
                let last = index.last_offset_entry();
                *segment.index.borrow_mut() = index;
                match last {
                    Some(e) => (
                        u64::from(e.position),
                        base_offset + i64::from(e.relative_offset),
                        u64::from(e.position) + 1,
                    ),
                    None => (0, base_offset, 0),
                }
            }
            None => (0, base_offset, 0),
        };
        let (end, stop) = segment.scan(scan_position, scan_offset, file_bytes, indexed_below).await?;
        match stop {
            None => assert_eq!(end, file_bytes, "a scan without a stop reads the whole file"),
            Some(reason) if sealed => {
                return Err(LogError::CorruptBatch {
                    reason: format!(
                        "sealed segment {} (of {file_bytes} bytes) is damaged at byte {end}: {reason}; \
                         the file was left as it is",
                        segment.path.display()
                    ),
                });
            }
            Some(_) => segment.cut_at(end, "truncating torn tail").await?,
        }
        segment.zeroed_end.set(end);
        Ok(segment)
    }

    /// Checks batches from `position` on, indexing them unless the index already covers them,
    /// and sets `size` and `next_offset` to the end of the last good batch. Returns that end
    /// and, if bytes follow it, why the scan stopped there.
    async fn scan(
        &self,
        mut position: u64,
        mut next_offset: i64,
        file_bytes: u64,
        indexed_below: u64,
    ) -> Result<(u64, Option<String>)> {
        let mut window = FileWindow::new(self, file_bytes, SCAN_READ_BYTES);
        let stop = loop {
            let left = file_bytes - position;
            if left == 0 {
                break None;
            }
            if left < LOG_OVERHEAD_BYTES as u64 {
                break Some(format!("{left} bytes follow the last batch, too few for a batch header"));
            }
            let head = window.bytes(position, LOG_OVERHEAD_BYTES).await?;
            let Some(total) = batch::claimed_batch_bytes(head) else {
                break Some("the batch length field is zero or impossible".to_string());
            };
            if position + total as u64 > file_bytes {
                break Some(format!("a batch of {total} bytes runs past the end of the file"));
            }
            let header = match batch::parse(window.bytes(position, total).await?) {
                Ok(header) => header,
                Err(LogError::CorruptBatch { reason }) => break Some(reason),
                Err(error) => break Some(error.to_string()),
            };
            if header.base_offset != next_offset {
                let source = if position == 0 { " (the file's name)" } else { "" };
                break Some(format!(
                    "the batch has base offset {} where {next_offset}{source} was expected",
                    header.base_offset
                ));
            }
            if position >= indexed_below {
                self.index.borrow_mut().on_batch(&header, position_u32(position));
            }
            position += total as u64;
            next_offset = header.next_offset();
        };
        self.size.set(position);
        self.next_offset.set(next_offset);
        Ok((position, stop))
    }

    /// Reads whole batches from the first one that holds offsets at or after `offset`, up to
    /// `max_bytes` (with `min_one`, always one batch however large; without, none when that
    /// batch is larger than `max_bytes`), never past the durable size and
    /// never a batch with an offset at or after `end_offset` (the log's durable offset: a
    /// segment's size grows before the log's durable offset does, see `Log::flush`).
    /// `resume` is what an earlier read of this segment left (see [`SegmentRead::rest`]):
    /// a read from where that one stopped starts there, with what it already holds.
    pub async fn read(
        &self,
        offset: i64,
        max_bytes: usize,
        end_offset: i64,
        min_one: bool,
        resume: Option<Resume>,
    ) -> Result<Option<SegmentRead>> {
        let size = self.size.get();
        let resume = resume.filter(|r| r.base_offset == self.base_offset && r.next_offset == offset);
        let mut position = match &resume {
            Some(resume) => resume.position,
            None => u64::from(self.index.borrow().position_for_offset(offset)),
        };
        let mut window = FileWindow::new(self, size, READAHEAD_BYTES.max(max_bytes));
        if let Some(resume) = resume {
            window.hold(resume.held);
        }
        let mut start = None;
        let mut next_offset = offset;
        loop {
            // A batch is at least a header: none starting here fits what is left.
            if start.is_some_and(|from| position + batch::HEADER_BYTES as u64 > from + max_bytes as u64) {
                break;
            }
            let Some(header) = self.header_at(&mut window, position).await? else { break };
            if header.next_offset() > end_offset {
                break;
            }
            let end = position + u64::from(header.total_bytes);
            match start {
                None if header.next_offset() <= offset => {}
                // Not even the first batch fits, and the caller wants nothing larger.
                None if !min_one && u64::from(header.total_bytes) > max_bytes as u64 => break,
                None => {
                    start = Some(position);
                    // What is returned starts here, and nothing past its budget is read.
                    window.keep_from(position);
                    window.cap_at(position + max_bytes as u64);
                }
                Some(from) if end - from > max_bytes as u64 => break,
                Some(_) => {}
            }
            if start.is_some() {
                next_offset = header.next_offset();
            }
            position = end;
        }
        let Some(from) = start else { return Ok(None) };
        let bytes = window.take(from, (position - from) as usize).await?;
        let held = window.into_held(position);
        let rest = Resume { base_offset: self.base_offset, next_offset, position, held };
        Ok(Some(SegmentRead { bytes, rest }))
    }

    /// Finds the first batch whose max timestamp is at or after `timestamp`, among the batches
    /// whose offsets are all below `end_offset` (as for [`Segment::read`]).
    pub async fn offset_for_timestamp(&self, timestamp: i64, end_offset: i64) -> Result<Option<i64>> {
        let mut position = u64::from(self.index.borrow().position_for_timestamp(timestamp));
        let mut window = FileWindow::new(self, self.size.get(), READAHEAD_BYTES);
        while let Some(header) = self.header_at(&mut window, position).await? {
            if header.next_offset() > end_offset {
                return Ok(None);
            }
            if header.max_timestamp >= timestamp {
                return Ok(Some(header.base_offset));
            }
            position += u64::from(header.total_bytes);
        }
        Ok(None)
    }

    /// The largest max timestamp of the batches before `position` (a batch boundary), or -1.
    /// Scans the batches after the index's last time entry before `position`.
    pub async fn max_timestamp_before(&self, position: u64) -> Result<i64> {
        let (start, mut max_timestamp) = self.index.borrow().max_timestamp_scan_start(position_u32(position));
        let mut at = u64::from(start);
        let mut window = FileWindow::new(self, position, READAHEAD_BYTES);
        while let Some(header) = self.header_at(&mut window, at).await? {
            max_timestamp = max_timestamp.max(header.max_timestamp);
            at += u64::from(header.total_bytes);
        }
        Ok(max_timestamp)
    }

    /// The position of the batch that starts at `offset`, or of the segment's end when
    /// `offset` is where it ends; `None` when `offset` is inside a batch.
    pub async fn position_of_batch(&self, offset: i64) -> Result<Option<u64>> {
        let mut position = u64::from(self.index.borrow().position_for_offset(offset));
        let mut window = FileWindow::new(self, self.size.get(), READAHEAD_BYTES);
        while let Some(header) = self.header_at(&mut window, position).await? {
            if header.base_offset >= offset {
                return Ok((header.base_offset == offset).then_some(position));
            }
            position += u64::from(header.total_bytes);
        }
        Ok((self.next_offset.get() == offset).then_some(position))
    }

    /// The header of the durable batch at `position`, or `None` at the durable end. A header
    /// that is cut short or claims to run past the end is an error, not a panic: the bytes
    /// come from disk.
    async fn header_at(&self, window: &mut FileWindow<'_>, position: u64) -> Result<Option<BatchHeader>> {
        let size = window.limit;
        if position == size {
            return Ok(None);
        }
        let corrupt = || LogError::CorruptBatch {
            reason: format!("durable batch at byte {position} of {} is damaged", self.path.display()),
        };
        if size - position < batch::HEADER_BYTES as u64 {
            return Err(corrupt());
        }
        let header =
            batch::stored_header(window.bytes(position, batch::HEADER_BYTES).await?).ok_or_else(corrupt)?;
        if position + u64::from(header.total_bytes) > size {
            return Err(corrupt());
        }
        Ok(Some(header))
    }

    /// The file opened a second time with O_DSYNC (on the first call; [`Segment::seal_writes`]
    /// closes it): a write through it is durable once it completes, with no fdatasync after.
    pub async fn dsync_file(&self) -> std::io::Result<Rc<DmaFile>> {
        if let Some(file) = self.dsync_file.borrow().as_ref() {
            return Ok(Rc::clone(file));
        }
        let file = OpenOptions::new().write(true).custom_flags(libc::O_DSYNC).dma_open(&self.path).await?;
        let file = Rc::new(file);
        *self.dsync_file.borrow_mut() = Some(Rc::clone(&file));
        Ok(file)
    }

    /// Closes what only writes need (the O_DSYNC descriptor: glommio closes a dropped file
    /// with its next I/O) once the segment is sealed.
    pub fn seal_writes(&self) {
        self.dsync_file.borrow_mut().take();
    }

    /// Cuts the file at `position` and makes the cut durable. `op` names the reason in errors.
    pub async fn cut_at(&self, position: u64, op: &'static str) -> Result<()> {
        self.zeroed_end.set(self.zeroed_end.get().min(position));
        self.file.truncate(position).await.map_err(|e| LogError::io(op, &self.path, e))?;
        self.file.fdatasync().await.map_err(|e| LogError::io(op, &self.path, e))
    }

    /// Writes the index next to the segment, for a faster open next time.
    pub fn persist_index(&self, dir: &Path) -> Result<()> {
        let path = dir.join(index_file_name(self.base_offset));
        let bytes = self.index.borrow().encode();
        std::fs::write(&path, bytes).map_err(|e| LogError::io("writing index", &path, e))
    }

    /// Reads the tail (the last partial block) that a writer continuing this segment at `size`
    /// (its durable size, or a batch boundary it is about to be cut at) rewrites.
    pub async fn read_tail(&self, size: u64) -> Result<Vec<u8>> {
        assert!(size <= self.size.get(), "a tail is read from durable bytes");
        let from = align_down(size);
        if from == size {
            return Ok(Vec::new());
        }
        let read = self
            .file
            .read_at(from, (size - from) as usize)
            .await
            .map_err(|e| LogError::io("reading tail", &self.path, e))?;
        if read.len() as u64 != size - from {
            return Err(LogError::io(
                "reading tail",
                &self.path,
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        Ok(read.to_vec())
    }
}

pub(crate) fn position_u32(position: u64) -> u32 {
    u32::try_from(position)
        .expect("batches start below SEGMENT_BYTES_MAX, which LogConfig::validate enforces")
}

/// A forward reader over a segment file. It reads with O_DIRECT from block boundaries, at
/// least `readahead` bytes at a time but not past `cap` unless a range asked for needs more,
/// never past `limit`, and keeps what it read as a run of chunks: a walk that goes on past
/// what the window holds reads only what follows, never a byte twice (a fetch that walked
/// its batches' headers used to read them all again to return them, and a header peek just
/// past the window read a whole new window: 1.14-1.35x the disk reads of the bytes served).
/// Chunks wholly before both the range asked for and `keep_from` are dropped as it goes.
struct FileWindow<'s> {
    segment: &'s Segment,
    limit: u64,
    readahead: usize,
    cap: u64,
    keep_from: u64,
    /// Contiguous chunks, each with its file position.
    chunks: VecDeque<(u64, Chunk)>,
    /// Where the next read starts: the end of the last chunk (a block boundary, or `limit`).
    end: u64,
    /// A range asked for that spans chunks, copied into one piece.
    joined: Vec<u8>,
}

impl<'s> FileWindow<'s> {
    fn new(segment: &'s Segment, limit: u64, readahead: usize) -> FileWindow<'s> {
        let (cap, keep_from, chunks, end, joined) = (limit, u64::MAX, VecDeque::new(), 0, Vec::new());
        FileWindow { segment, limit, readahead, cap, keep_from, chunks, end, joined }
    }

    /// Starts from chunks an earlier window over the same file read. Bytes past this window's
    /// limit are not kept, nor a last partial block: the next read starts on a boundary.
    fn hold(&mut self, held: Held) {
        let end = align_down((held.at + held.bytes.len() as u64).min(self.limit));
        if end > held.at {
            let bytes = held.bytes.slice(..(end - held.at) as usize);
            self.chunks = VecDeque::from([(held.at, Chunk::Held(bytes))]);
            self.end = end;
        }
    }

    /// What the window holds from `position` on, copied out of the reads' buffers: those may
    /// be io_uring-registered memory, which the flushes' writes need, and a read ahead can
    /// wait long for its reader.
    fn into_held(self, position: u64) -> Held {
        let mut bytes = bytes::BytesMut::new();
        if position < self.end {
            bytes.reserve((self.end - position) as usize);
            self.for_each_piece(position, (self.end - position) as usize, |piece| {
                bytes.extend_from_slice(piece)
            });
        }
        Held { at: position, bytes: bytes.freeze() }
    }

    /// Reads stop at `position` from now on, unless a range asked for goes further.
    fn cap_at(&mut self, position: u64) {
        self.cap = position.min(self.limit);
    }

    /// The walk may come back for bytes from `position` on, so they stay.
    fn keep_from(&mut self, position: u64) {
        self.keep_from = position;
    }

    /// The `len` bytes at `position`, read if the window does not hold them yet.
    async fn bytes(&mut self, position: u64, len: usize) -> Result<&[u8]> {
        if len == 0 {
            return Ok(&[]);
        }
        self.fill(position, len).await?;
        let (index, at) = self.chunk_at(position);
        let chunk = &self.chunks[index].1;
        if at + len <= chunk.len() {
            return Ok(&chunk[at..at + len]);
        }
        let mut joined = std::mem::take(&mut self.joined);
        joined.clear();
        self.for_each_piece(position, len, |piece| joined.extend_from_slice(piece));
        self.joined = joined;
        Ok(&self.joined)
    }

    /// The `len` bytes at `position` as one buffer of their own: the only copy a read makes.
    async fn take(&mut self, position: u64, len: usize) -> Result<bytes::Bytes> {
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        self.fill(position, len).await?;
        let mut out = bytes::BytesMut::with_capacity(len);
        self.for_each_piece(position, len, |piece| out.extend_from_slice(piece));
        Ok(out.freeze())
    }

    async fn fill(&mut self, position: u64, len: usize) -> Result<()> {
        let end = position + len as u64;
        assert!(end <= self.limit, "window read past its limit");
        let start = self.chunks.front().map_or(self.end, |(at, _)| *at);
        let keep = self.keep_from.min(position);
        if position < start || keep > self.end {
            // Nothing held is wanted any more (or the walk went back): start over here.
            self.chunks.clear();
            self.end = align_down(position);
        }
        while self.chunks.front().is_some_and(|(at, chunk)| at + chunk.len() as u64 <= keep) {
            self.chunks.pop_front();
        }
        while self.end < end {
            let until = (position + self.readahead as u64).min(self.cap).max(end).min(self.limit);
            let size = (align_up(until) - self.end) as usize;
            let segment = self.segment;
            let read = segment
                .file
                .read_at_aligned(self.end, size)
                .await
                .map_err(|e| LogError::io("reading segment", &segment.path, e))?;
            segment.disk_bytes_read.set(segment.disk_bytes_read.get() + read.len() as u64);
            // All of what was read (to a block boundary, or the limit) is kept: the window's
            // end stays a block boundary for the next read.
            let usable = (read.len() as u64).min(self.limit - self.end) as usize;
            if (usable as u64) < until - self.end {
                let eof = std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "segment shorter than its durable size",
                );
                return Err(LogError::io("reading segment", &segment.path, eof));
            }
            let chunk = ReadResult::slice(&read, 0, usable).expect("within the read");
            self.chunks.push_back((self.end, Chunk::Read(chunk)));
            self.end += usable as u64;
        }
        Ok(())
    }

    /// The chunk that holds `position`, and where in it.
    fn chunk_at(&self, position: u64) -> (usize, usize) {
        let index = self.chunks.partition_point(|(at, chunk)| at + chunk.len() as u64 <= position);
        (index, (position - self.chunks[index].0) as usize)
    }

    /// Calls `f` with the pieces of the held range `position..position + len`, in order.
    fn for_each_piece(&self, position: u64, len: usize, mut f: impl FnMut(&[u8])) {
        let (first, mut at) = self.chunk_at(position);
        let mut left = len;
        for (_, chunk) in self.chunks.range(first..) {
            if left == 0 {
                break;
            }
            let n = (chunk.len() - at).min(left);
            f(&chunk[at..at + n]);
            left -= n;
            at = 0;
        }
        assert_eq!(left, 0, "the range is held");
    }
}

/// What a [`Segment::read`] returns.
pub struct SegmentRead {
    /// Whole batches.
    pub bytes: bytes::Bytes,
    /// Where the read stopped (the offset that follows the last batch, [`Resume::next_offset`])
    /// and what it read past that, for a read that goes on from there.
    pub rest: Resume,
}

/// Where a segment read stopped (the position of the batch at `next_offset`) and the bytes
/// from there it had already read.
pub struct Resume {
    base_offset: i64,
    next_offset: i64,
    position: u64,
    held: Held,
}

impl Resume {
    /// The offset a read going on from here starts at.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }
}

/// What a [`FileWindow`] read from `at` on (a batch boundary), in heap memory.
struct Held {
    at: u64,
    bytes: bytes::Bytes,
}

/// Bytes a [`FileWindow`] holds: a read's own buffer, or what an earlier window read.
enum Chunk {
    Read(ReadResult),
    Held(bytes::Bytes),
}

impl std::ops::Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Read(read) => read,
            Chunk::Held(bytes) => bytes,
        }
    }
}

/// The header and bytes of a batch that has its offset.
#[derive(Debug, Clone)]
pub struct StampedBatch {
    pub header: BatchHeader,
    pub bytes: bytes::Bytes,
}
