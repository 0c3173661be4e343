//! One pipelined connection to a broker port, generic over the protocol's [`Framing`]. The
//! native protocol's [`super::Connection`] and Kafka's [`super::KafkaPipeline`] are this
//! [`Pipeline`] with their own framing; everything else, written once here, is common.
//!
//! Writers are the calling threads: under the write lock a request is encoded, registered as
//! pending under a fresh correlation id, then written whole (TCP_NODELAY, so small requests
//! leave at once). The write lock makes the wire's order the call order, so requests sent to
//! one partition leave in the order they were sent. One reader thread per connection reads
//! response frames and completes the pending request each one answers. How a response finds
//! its request is the protocol's [`Matching`] discipline:
//!
//! - [`Matching::ById`] (native): a shard answers requests as they complete, so responses come
//!   back in any order, each carrying its request's correlation id. A response nobody waits
//!   for any more (its request timed out) is dropped.
//! - [`Matching::InOrder`] (Kafka): a broker answers a connection's requests one after the
//!   other, so each response answers the oldest pending request, and must carry its
//!   correlation id: any other response is a protocol error that closes the connection.
//!
//! A request the broker does not answer (a produce with acks 0) is written with
//! [`Pipeline::send_no_response`] and never registered: under `InOrder` it would otherwise
//! take the next response meant for another request.
//!
//! Invariants:
//! - At most `max_in_flight` requests are pending; a sender blocks (up to its request timeout)
//!   for a free slot.
//! - A request is registered before its bytes are written, so its response always finds it.
//! - A request leaves `pending` under the state lock together with its outcome becoming
//!   takeable (its response sent to its channel, or its channel dropped), and its
//!   [`Doorbell`], if any, rings after: a ring always finds an outcome to take.
//! - Once the connection fails (peer closed, I/O error, oversized, undecodable or unexpected
//!   frame), it is closed for good: every pending and every later request fails with
//!   [`ClientError::Disconnected`] carrying the first failure's reason. Nothing waits forever:
//!   every wait is bounded by the request timeout.
//! - A response frame is never larger than [`RESPONSE_FRAME_BYTES_MAX`]; its buffer grows with
//!   the bytes actually received, not with the length the peer claims.
//!
//! This is not a reconnecting connection: [`super::Client`] and [`super::KafkaClient`] replace
//! a closed one.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{ClientError, Result};

/// Bytes a connection's reader asks the socket for at once.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Default bound on requests awaiting a response on one connection.
pub const IN_FLIGHT_MAX_DEFAULT: usize = 1024;
/// Largest response frame a client accepts; a larger one closes the connection.
pub const RESPONSE_FRAME_BYTES_MAX: usize = 64 << 20;
/// Default time to establish a TCP connection.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Default time from sending a request to its response (fetch long-polls included).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Both protocols open a frame with its body's length as a 4-byte big-endian integer (signed
/// in Kafka, where a negative length is as far out of bounds as one over the maximum).
const FRAME_PREFIX_BYTES: usize = 4;
const _: () = assert!(crate::codec::FRAME_PREFIX_BYTES == FRAME_PREFIX_BYTES);
const _: () = assert!(crate::kafka::FRAME_PREFIX_BYTES == FRAME_PREFIX_BYTES);

/// Bytes of the write buffer kept between requests; a larger one is let go after its write.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    /// Bounds each wait: for an in-flight slot, for a write, and for a response.
    pub request_timeout: Duration,
    pub max_in_flight: usize,
    /// How long a request keeps following its partition's leader after it first failed
    /// because the leader moved (see [`super::failover`]).
    pub leader_retry_budget: Duration,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            max_in_flight: IN_FLIGHT_MAX_DEFAULT,
            leader_retry_budget: super::failover::LEADER_RETRY_BUDGET_DEFAULT,
        }
    }
}

/// What a protocol supplies to a [`Pipeline`]: how a request is framed, and how a response
/// frame is decoded and matched to its request.
pub trait Framing: Debug + Send + Sync + Sized + 'static {
    /// What a caller sends.
    type Request<'a>: Copy;
    /// What a waiter receives.
    type Response: Debug + Send + 'static;
    /// What the reader must know of a pending request to decode its response (`()` when the
    /// response frame says everything itself).
    type Expected: Debug + Send + 'static;

    /// How responses find their requests, with the decoder that goes with it.
    const MATCHING: Matching<Self>;
    /// The reader thread's name, before the broker's address.
    const READER_NAME: &'static str;
    /// The correlation id of a connection's first request; each next one is one more.
    const CORRELATION_ID_FIRST: u64;

    /// The request's name in errors ("produce", "fetch", ...).
    fn op(request: Self::Request<'_>) -> &'static str;

    /// Appends the whole request frame, length prefix included, to the empty `buf`.
    fn encode(
        &self,
        correlation_id: u64,
        request: Self::Request<'_>,
        buf: &mut BytesMut,
    ) -> Result<Self::Expected>;
}

/// How a [`Pipeline`]'s reader finds the pending request a response frame answers (see the
/// module docs). Each discipline carries its decoder, which gets a frame body (without its
/// length prefix) and says why in an `Err` when it cannot be read: that closes the connection.
pub enum Matching<F: Framing> {
    /// Responses come back in any order, each naming its request: the decoder returns the
    /// correlation id it carries with the response. A request whose waiter timed out is
    /// forgotten at once, freeing its slot; its late response is dropped.
    ById(DecodeNamed<F>),
    /// Responses come back in request order: the decoder reads the frame as the answer to the
    /// oldest pending request, given what [`Framing::encode`] returned for it, and fails if the
    /// frame carries another correlation id. A request whose waiter timed out stays pending,
    /// holding its slot, until its response arrives: it must still be read off the wire in
    /// turn, then it is dropped.
    InOrder(DecodeAnswer<F>),
}

/// A [`Matching::ById`] decoder: the correlation id a frame carries, and its response.
pub type DecodeNamed<F> = fn(Bytes) -> Result<(u64, <F as Framing>::Response), String>;

/// A [`Matching::InOrder`] decoder: the frame read as the answer to the request it is given.
pub type DecodeAnswer<F> = fn(Bytes, &<F as Framing>::Expected) -> Result<<F as Framing>::Response, String>;

/// Wakes one thread waiting for whichever of several requests completes first (a consumer
/// with a fetch in flight per partition). Each completion (or failure) of a request it is
/// attached to rings it once, after the outcome can be taken with `try_wait`.
#[derive(Debug, Default)]
pub struct Doorbell {
    rings: Mutex<u64>,
    rung: Condvar,
}

impl Doorbell {
    /// How many times it has rung: read before looking at the requests, then
    /// [`Doorbell::wait_past`] that count, so no completion falls between the look and the wait.
    pub fn rings(&self) -> u64 {
        *self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until it has rung more than `seen` times, or `timeout` passes.
    pub fn wait_past(&self, seen: u64, timeout: Duration) {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.rung.wait_timeout_while(rings, timeout, |rings| *rings <= seen);
    }

    /// Rings once. Transports call it when an outcome becomes known.
    pub fn ring(&self) {
        *self.rings.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.rung.notify_all();
    }
}

/// A pending request, as the reader sees it.
#[derive(Debug)]
struct Slot<F: Framing> {
    /// Holds one response; dropped unused, it wakes the waiter with a disconnect.
    /// Takes the response with the moment it was read off the socket.
    complete: SyncSender<(Instant, F::Response)>,
    expected: F::Expected,
    /// Rung once the response is in `complete`, or the slot is dropped.
    doorbell: Option<Arc<Doorbell>>,
}

#[derive(Debug)]
struct State<F: Framing> {
    /// Requests registered and not answered, by correlation id: oldest first.
    pending: BTreeMap<u64, Slot<F>>,
    /// Why the connection closed; `Some` forever once set.
    closed: Option<String>,
}

#[derive(Debug)]
struct Shared<F: Framing> {
    addr: SocketAddr,
    state: Mutex<State<F>>,
    /// Signalled when an in-flight slot frees up or the connection closes.
    slot_freed: Condvar,
    max_in_flight: usize,
}

impl<F: Framing> Shared<F> {
    fn lock(&self) -> MutexGuard<'_, State<F>> {
        // A panic while holding this lock leaves the map consistent (single inserts/removes).
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn disconnected(&self, state: &State<F>) -> ClientError {
        let reason = state.closed.clone().unwrap_or_else(|| "connection closed".to_owned());
        ClientError::Disconnected { addr: self.addr, reason }
    }

    fn closed_error(&self) -> Option<ClientError> {
        let state = self.lock();
        state.closed.is_some().then(|| self.disconnected(&state))
    }

    /// Closes the connection: records the first reason and drops every pending completion,
    /// which wakes each waiter with a disconnect.
    fn close(&self, reason: String) {
        let mut state = self.lock();
        state.closed.get_or_insert(reason);
        // The slots are dropped under the lock, so a request found gone from `pending` can
        // already see its disconnect; their doorbells ring after.
        let doorbells: Vec<Arc<Doorbell>> =
            std::mem::take(&mut state.pending).into_values().filter_map(|slot| slot.doorbell).collect();
        drop(state);
        self.slot_freed.notify_all();
        for doorbell in doorbells {
            doorbell.ring();
        }
    }
}

#[derive(Debug)]
struct Writer<F> {
    stream: TcpStream,
    buf: BytesMut,
    next_correlation_id: u64,
    framing: F,
}

/// A pipelined connection speaking the protocol `F` (see the module docs). Share it between
/// threads behind an `Arc`.
#[derive(Debug)]
pub struct Pipeline<F: Framing> {
    shared: Arc<Shared<F>>,
    writer: Mutex<Writer<F>>,
    request_timeout: Duration,
    reader: Option<JoinHandle<()>>,
}

impl<F: Framing> Pipeline<F> {
    /// Connects to one broker port and starts the reader. Name resolution is the caller's.
    pub fn open(addr: SocketAddr, options: ConnectOptions, framing: F) -> Result<Pipeline<F>> {
        assert!(options.max_in_flight > 0, "max_in_flight must allow one request");
        let io_error = |error| ClientError::Connect { addr, error };
        let stream = TcpStream::connect_timeout(&addr, options.connect_timeout).map_err(io_error)?;
        stream.set_nodelay(true).map_err(io_error)?;
        stream.set_write_timeout(Some(options.request_timeout)).map_err(io_error)?;
        let read_stream = stream.try_clone().map_err(io_error)?;
        let shared = Arc::new(Shared {
            addr,
            state: Mutex::new(State { pending: BTreeMap::new(), closed: None }),
            slot_freed: Condvar::new(),
            max_in_flight: options.max_in_flight,
        });
        let reader_shared = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name(format!("{}-{addr}", F::READER_NAME))
            .spawn(move || read_loop(read_stream, &reader_shared))
            .map_err(io_error)?;
        let writer = Writer {
            stream,
            buf: BytesMut::with_capacity(WRITE_BUFFER_BYTES),
            next_correlation_id: F::CORRELATION_ID_FIRST,
            framing,
        };
        Ok(Pipeline {
            shared,
            writer: Mutex::new(writer),
            request_timeout: options.request_timeout,
            reader: Some(reader),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// True once the connection has failed; it never reopens.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Requests awaiting a response.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Sends `request` and returns at once; the response arrives through the handle.
    pub fn send(&self, request: F::Request<'_>) -> Result<PendingResponse<F>> {
        let op = F::op(request);
        let deadline = Instant::now() + self.request_timeout;
        let mut writer = self.lock_writer();
        let correlation_id = writer.next_correlation_id;
        // Encoded before it is registered: a request that cannot be encoded is never pending.
        let expected = writer.encode(correlation_id, request)?;
        let (complete, completion) = mpsc::sync_channel(1);
        self.register(correlation_id, Slot { complete, expected, doorbell: None }, op, deadline)?;
        writer.next_correlation_id += 1;
        self.write(&mut writer, op)?;
        Ok(PendingResponse {
            shared: Arc::clone(&self.shared),
            correlation_id,
            completion,
            op,
            deadline,
            timeout: self.request_timeout,
        })
    }

    /// Sends a request the broker does not answer (a produce with acks 0 / `Acks::None`).
    pub fn send_no_response(&self, request: F::Request<'_>) -> Result<()> {
        let mut writer = self.lock_writer();
        if let Some(error) = self.shared.closed_error() {
            return Err(error);
        }
        let correlation_id = writer.next_correlation_id;
        writer.encode(correlation_id, request)?;
        writer.next_correlation_id += 1;
        self.write(&mut writer, F::op(request))
    }

    /// [`Pipeline::send`] then [`PendingResponse::wait`].
    pub fn call(&self, request: F::Request<'_>) -> Result<F::Response> {
        self.send(request)?.wait()
    }

    /// [`Pipeline::call`], giving up on the response after `timeout` if that is shorter than
    /// the request timeout.
    pub fn call_within(&self, request: F::Request<'_>, timeout: Duration) -> Result<F::Response> {
        let mut pending = self.send(request)?;
        if timeout < pending.timeout {
            pending.deadline = pending.deadline - pending.timeout + timeout;
            pending.timeout = timeout;
        }
        pending.wait()
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer<F>> {
        self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for an in-flight slot, then records `slot` under `correlation_id`.
    fn register(
        &self,
        correlation_id: u64,
        slot: Slot<F>,
        op: &'static str,
        deadline: Instant,
    ) -> Result<()> {
        let mut state = self.shared.lock();
        loop {
            if state.closed.is_some() {
                return Err(self.shared.disconnected(&state));
            }
            if state.pending.len() < self.shared.max_in_flight {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout {
                    addr: self.shared.addr,
                    op,
                    waited: self.request_timeout,
                });
            }
            state = self
                .shared
                .slot_freed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        let previous = state.pending.insert(correlation_id, slot);
        assert!(previous.is_none(), "correlation ids are never reused on a connection");
        Ok(())
    }

    /// Writes the encoded frame in the writer's buffer.
    fn write(&self, writer: &mut Writer<F>, op: &'static str) -> Result<()> {
        let Writer { stream, buf, .. } = writer;
        assert!(!buf.is_empty(), "a request is encoded before it is written");
        if let Err(error) = stream.write_all(buf) {
            // A partial write leaves the stream mid-frame: the connection cannot be reused.
            self.shared.close(format!("writing a {op} request: {error}"));
            let _ = stream.shutdown(Shutdown::Both);
            return Err(self.shared.closed_error().expect("just closed"));
        }
        // Keep the buffer from pinning a huge allocation after one large produce.
        if buf.capacity() > 1 << 20 {
            *buf = BytesMut::with_capacity(WRITE_BUFFER_BYTES);
        }
        Ok(())
    }
}

impl<F: Framing> Writer<F> {
    fn encode(&mut self, correlation_id: u64, request: F::Request<'_>) -> Result<F::Expected> {
        self.buf.clear();
        self.framing.encode(correlation_id, request, &mut self.buf)
    }
}

impl<F: Framing> Drop for Pipeline<F> {
    fn drop(&mut self) {
        self.shared.close("connection dropped by the client".to_owned());
        let writer = self.writer.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = writer.stream.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            // The shutdown above ends the reader's blocking read.
            let _ = reader.join();
        }
    }
}

/// A request on its way; [`PendingResponse::wait`] blocks for its response.
#[derive(Debug)]
pub struct PendingResponse<F: Framing> {
    shared: Arc<Shared<F>>,
    correlation_id: u64,
    completion: Receiver<(Instant, F::Response)>,
    op: &'static str,
    deadline: Instant,
    timeout: Duration,
}

impl<F: Framing> PendingResponse<F> {
    pub fn correlation_id(&self) -> u64 {
        self.correlation_id
    }

    /// Rings `doorbell` when the outcome is known: at once if it already is (answered, or the
    /// connection closed), else when the response arrives or the connection fails.
    pub fn ring_on_completion(&self, doorbell: &Arc<Doorbell>) {
        let mut state = self.shared.lock();
        match state.pending.get_mut(&self.correlation_id) {
            Some(slot) => slot.doorbell = Some(Arc::clone(doorbell)),
            None => {
                drop(state);
                doorbell.ring();
            }
        }
    }

    /// Waits for the response until the request timeout, counted from the send.
    pub fn wait(self) -> Result<F::Response> {
        self.wait_timed().map(|(_, response)| response)
    }

    /// [`PendingResponse::wait`], with the moment the response was read off the socket (the
    /// latency a caller measures should not include how late it looked).
    pub fn wait_timed(self) -> Result<(Instant, F::Response)> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.completion.recv_timeout(left) {
            Ok(timed) => Ok(timed),
            Err(RecvTimeoutError::Disconnected) => Err(self.disconnected()),
            Err(RecvTimeoutError::Timeout) => Err(self.timed_out()),
        }
    }

    /// Waits for the response at most `limit`, never past the request timeout: `None` if it is
    /// still due then, so that the caller can look around (did the partition's leader move?)
    /// and wait again.
    pub fn wait_timed_within(&mut self, limit: Duration) -> Option<Result<(Instant, F::Response)>> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.completion.recv_timeout(left.min(limit)) {
            Ok(timed) => Some(Ok(timed)),
            Err(RecvTimeoutError::Disconnected) => Some(Err(self.disconnected())),
            Err(RecvTimeoutError::Timeout) if limit < left => None,
            Err(RecvTimeoutError::Timeout) => Some(Err(self.timed_out())),
        }
    }

    /// Gives up on the response before its deadline (the caller sends the request elsewhere):
    /// as after a timeout, a request matched by id is forgotten and its slot freed, and one
    /// matched in order stays pending until its response is read in turn.
    pub fn abandon(self) {
        self.forget();
    }

    /// The response if it has arrived, `None` if it is still due, an error if it failed or its
    /// deadline passed by `now` (the caller's clock reading: pollers read it once per round).
    pub fn try_wait(&mut self, now: Instant) -> Option<Result<F::Response>> {
        self.try_wait_timed(now).map(|timed| timed.map(|(_, response)| response))
    }

    /// [`PendingResponse::try_wait`], with the moment the response was read off the socket.
    pub fn try_wait_timed(&mut self, now: Instant) -> Option<Result<(Instant, F::Response)>> {
        match self.completion.try_recv() {
            Ok(timed) => Some(Ok(timed)),
            Err(TryRecvError::Disconnected) => Some(Err(self.disconnected())),
            Err(TryRecvError::Empty) if now >= self.deadline => Some(Err(self.timed_out())),
            Err(TryRecvError::Empty) => None,
        }
    }

    fn disconnected(&self) -> ClientError {
        self.shared.disconnected(&self.shared.lock())
    }

    /// Gives up on the response at its deadline (if the response raced the deadline it is
    /// already gone; the caller sees a timeout).
    fn timed_out(&self) -> ClientError {
        self.forget();
        ClientError::Timeout { addr: self.shared.addr, op: self.op, waited: self.timeout }
    }

    /// Matched by id, the request is forgotten and its slot freed. Matched in order, it stays
    /// pending: its response still comes ahead of later ones.
    fn forget(&self) {
        if let Matching::ById(_) = F::MATCHING {
            self.shared.lock().pending.remove(&self.correlation_id);
            self.shared.slot_freed.notify_one();
        }
    }
}

fn read_loop<F: Framing>(stream: TcpStream, shared: &Shared<F>) {
    // Small responses that arrive together are taken with one system call, not two each
    // (size prefix, then body); a large body is read past the buffer, straight into its own.
    let mut reader = std::io::BufReader::with_capacity(READ_BUFFER_BYTES, &stream);
    let reason = loop {
        let answered = read_frame(&mut reader).and_then(|frame| complete(shared, frame));
        if let Err(reason) = answered {
            break reason;
        }
    };
    shared.close(reason);
    let _ = stream.shutdown(Shutdown::Both);
}

/// Hands a response frame to the pending request it answers, or says why the connection is
/// over.
fn complete<F: Framing>(shared: &Shared<F>, frame: Bytes) -> Result<(), String> {
    let arrived = Instant::now();
    let doorbell = match F::MATCHING {
        Matching::ById(decode) => {
            let (correlation_id, response) = decode(frame)?;
            let mut state = shared.lock();
            state.pending.remove(&correlation_id).and_then(|slot| slot.answer(arrived, response))
        }
        Matching::InOrder(decode) => {
            let mut state = shared.lock();
            // Decoded before it is taken: an undecodable answer leaves its request pending,
            // for the close that follows to fail (and ring) with the reason.
            let Some((_, oldest)) = state.pending.first_key_value() else {
                return Err("a response arrived with no request waiting for it".to_owned());
            };
            let response = decode(frame, &oldest.expected)?;
            let (_, slot) = state.pending.pop_first().expect("looked at above");
            slot.answer(arrived, response)
        }
    };
    shared.slot_freed.notify_one();
    if let Some(doorbell) = doorbell {
        doorbell.ring();
    }
    Ok(())
}

impl<F: Framing> Slot<F> {
    /// Hands the response to its waiter and returns the doorbell to ring. Called under the
    /// state lock, so once a slot is gone from `pending` its response can be taken (see
    /// [`PendingResponse::ring_on_completion`]). No slot, or its waiter gone: the request timed
    /// out and the response is dropped. Sending cannot block: the channel holds one response
    /// and only this one is sent on it.
    fn answer(self, arrived: Instant, response: F::Response) -> Option<Arc<Doorbell>> {
        let _ = self.complete.try_send((arrived, response));
        self.doorbell
    }
}

/// Reads one frame body, or says why the connection is over.
fn read_frame(stream: &mut impl Read) -> Result<Bytes, String> {
    let mut prefix = [0u8; FRAME_PREFIX_BYTES];
    if let Err(error) = stream.read_exact(&mut prefix) {
        return Err(match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "the broker closed the connection".to_owned(),
            _ => format!("reading a response: {error}"),
        });
    }
    let body_bytes = u32::from_be_bytes(prefix) as usize;
    if body_bytes > RESPONSE_FRAME_BYTES_MAX {
        return Err(format!(
            "response frame of {body_bytes} bytes exceeds RESPONSE_FRAME_BYTES_MAX ({RESPONSE_FRAME_BYTES_MAX})"
        ));
    }
    // Grows with what arrives, so a lying prefix costs no more memory than the bytes sent.
    let mut body = Vec::with_capacity(body_bytes.min(64 << 10));
    match stream.take(body_bytes as u64).read_to_end(&mut body) {
        Ok(n) if n == body_bytes => Ok(Bytes::from(body)),
        Ok(n) => Err(format!("the broker closed the connection {n} bytes into a {body_bytes}-byte frame")),
        Err(error) => Err(format!("reading a response: {error}")),
    }
}
