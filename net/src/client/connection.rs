//! One pipelined connection to a broker port.
//!
//! Writers are the calling threads: they take the write lock, register the request under a
//! fresh correlation id, and write the whole frame (TCP_NODELAY, so small requests leave at
//! once). One reader thread per connection reads response frames and completes the pending
//! request with the same correlation id, whatever order they come back in.
//!
//! Invariants:
//! - At most `max_in_flight` requests await a response; a sender blocks (up to its request
//!   timeout) for a free slot.
//! - A request is registered before its bytes are written, so its response always finds it.
//! - Once the connection fails (peer closed, I/O error, oversized or undecodable frame), it is
//!   closed for good: every pending and every later request fails with
//!   [`ClientError::Disconnected`] carrying the first failure's reason. Nothing waits forever:
//!   every wait is bounded by the request timeout.
//! - A response frame is never larger than [`RESPONSE_FRAME_BYTES_MAX`]; its buffer grows with
//!   the bytes actually received, not with the length the peer claims.
//!
//! This is not a reconnecting connection: [`super::Client`] replaces a closed one.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::ClientError;
use crate::codec::{self, Request, ResponseFrame, FRAME_PREFIX_BYTES};

/// Default bound on requests awaiting a response on one connection.
pub const IN_FLIGHT_MAX_DEFAULT: usize = 1024;
/// Largest response frame a client accepts; a larger one closes the connection.
pub const RESPONSE_FRAME_BYTES_MAX: usize = 64 << 20;
/// Default time to establish a TCP connection.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Default time from sending a request to its response (fetch long-polls included).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    /// Bounds each wait: for an in-flight slot, for a write, and for a response.
    pub request_timeout: Duration,
    pub max_in_flight: usize,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            max_in_flight: IN_FLIGHT_MAX_DEFAULT,
        }
    }
}

type Completion = SyncSender<ResponseFrame>;

#[derive(Debug)]
struct State {
    pending: HashMap<u64, Completion>,
    /// Why the connection closed; `Some` forever once set.
    closed: Option<String>,
}

#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
    /// Signalled when an in-flight slot frees up or the connection closes.
    slot_freed: Condvar,
    max_in_flight: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the map consistent (single inserts/removes).
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn disconnected(&self, state: &State) -> ClientError {
        let reason = state.closed.clone().unwrap_or_else(|| "connection closed".to_owned());
        ClientError::Disconnected { addr: self.addr, reason }
    }

    /// Closes the connection: records the first reason and drops every pending completion,
    /// which wakes each waiter with a disconnect.
    fn close(&self, reason: String) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.closed = Some(reason);
        }
        state.pending.clear();
        drop(state);
        self.slot_freed.notify_all();
    }
}

#[derive(Debug)]
struct Writer {
    stream: TcpStream,
    buf: BytesMut,
    next_correlation_id: u64,
}

/// A pipelined connection. Share it between threads behind an `Arc`.
#[derive(Debug)]
pub struct Connection {
    shared: Arc<Shared>,
    writer: Mutex<Writer>,
    request_timeout: Duration,
    reader: Option<JoinHandle<()>>,
}

impl Connection {
    /// Connects to one broker port. Name resolution is the caller's (see [`super::Client`]).
    pub fn connect(addr: SocketAddr, options: ConnectOptions) -> Result<Connection, ClientError> {
        assert!(options.max_in_flight > 0, "max_in_flight must allow one request");
        let stream = TcpStream::connect_timeout(&addr, options.connect_timeout)
            .map_err(|source| ClientError::Connect { addr, source })?;
        Connection::from_stream(stream, addr, options)
    }

    fn from_stream(
        stream: TcpStream,
        addr: SocketAddr,
        options: ConnectOptions,
    ) -> Result<Connection, ClientError> {
        let io_error = |source| ClientError::Connect { addr, source };
        stream.set_nodelay(true).map_err(io_error)?;
        stream.set_write_timeout(Some(options.request_timeout)).map_err(io_error)?;
        let read_stream = stream.try_clone().map_err(io_error)?;
        let shared = Arc::new(Shared {
            addr,
            state: Mutex::new(State { pending: HashMap::new(), closed: None }),
            slot_freed: Condvar::new(),
            max_in_flight: options.max_in_flight,
        });
        let reader_shared = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name(format!("pyralog-conn-{addr}"))
            .spawn(move || read_loop(read_stream, &reader_shared))
            .map_err(io_error)?;
        let writer = Writer { stream, buf: BytesMut::with_capacity(64 << 10), next_correlation_id: 1 };
        Ok(Connection {
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
    pub fn send(&self, request: &Request) -> Result<PendingResponse, ClientError> {
        let deadline = Instant::now() + self.request_timeout;
        let mut writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let correlation_id = writer.next_correlation_id;
        let (complete, completion) = mpsc::sync_channel(1);
        self.register(correlation_id, complete, request.kind(), deadline)?;
        writer.next_correlation_id += 1;
        self.write(&mut writer, correlation_id, request)?;
        Ok(PendingResponse {
            shared: Arc::clone(&self.shared),
            correlation_id,
            completion,
            op: request.kind(),
            deadline,
            timeout: self.request_timeout,
        })
    }

    /// Sends a request the broker does not answer (a produce with `Acks::None`).
    pub fn send_no_response(&self, request: &Request) -> Result<(), ClientError> {
        let mut writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(error) = self.closed_error() {
            return Err(error);
        }
        let correlation_id = writer.next_correlation_id;
        writer.next_correlation_id += 1;
        self.write(&mut writer, correlation_id, request)
    }

    /// [`Connection::send`] then [`PendingResponse::wait`].
    pub fn call(&self, request: &Request) -> Result<ResponseFrame, ClientError> {
        self.send(request)?.wait()
    }

    fn closed_error(&self) -> Option<ClientError> {
        let state = self.shared.lock();
        state.closed.is_some().then(|| self.shared.disconnected(&state))
    }

    /// Waits for an in-flight slot, then records the completion under `correlation_id`.
    fn register(
        &self,
        correlation_id: u64,
        complete: Completion,
        op: &'static str,
        deadline: Instant,
    ) -> Result<(), ClientError> {
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
        let previous = state.pending.insert(correlation_id, complete);
        assert!(previous.is_none(), "correlation ids are never reused on a connection");
        Ok(())
    }

    fn write(&self, writer: &mut Writer, correlation_id: u64, request: &Request) -> Result<(), ClientError> {
        let Writer { stream, buf, .. } = writer;
        buf.clear();
        codec::encode_request(correlation_id, request, buf);
        if let Err(error) = stream.write_all(buf) {
            // A partial write leaves the stream mid-frame: the connection cannot be reused.
            let reason = format!("writing a {} request: {error}", request.kind());
            self.shared.close(reason);
            let _ = stream.shutdown(Shutdown::Both);
            return Err(self.closed_error().expect("just closed"));
        }
        // Keep the buffer from pinning a huge allocation after one large produce.
        if buf.capacity() > 1 << 20 {
            *buf = BytesMut::with_capacity(64 << 10);
        }
        Ok(())
    }
}

impl Drop for Connection {
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
pub struct PendingResponse {
    shared: Arc<Shared>,
    correlation_id: u64,
    completion: Receiver<ResponseFrame>,
    op: &'static str,
    deadline: Instant,
    timeout: Duration,
}

impl PendingResponse {
    pub fn correlation_id(&self) -> u64 {
        self.correlation_id
    }

    /// Waits for the response until the request timeout, counted from the send.
    pub fn wait(self) -> Result<ResponseFrame, ClientError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.completion.recv_timeout(left) {
            Ok(frame) => Ok(frame),
            Err(RecvTimeoutError::Disconnected) => Err(self.disconnected()),
            Err(RecvTimeoutError::Timeout) => Err(self.timed_out()),
        }
    }

    /// The response if it has arrived, `None` if it is still due, an error if it failed or its
    /// deadline passed.
    pub fn try_wait(&mut self) -> Option<Result<ResponseFrame, ClientError>> {
        match self.completion.try_recv() {
            Ok(frame) => Some(Ok(frame)),
            Err(TryRecvError::Disconnected) => Some(Err(self.disconnected())),
            Err(TryRecvError::Empty) if Instant::now() >= self.deadline => Some(Err(self.timed_out())),
            Err(TryRecvError::Empty) => None,
        }
    }

    fn disconnected(&self) -> ClientError {
        self.shared.disconnected(&self.shared.lock())
    }

    /// Gives up on the response: frees its slot so a late answer is dropped by the reader.
    fn timed_out(&self) -> ClientError {
        // If the response raced the deadline it is already gone; the caller sees a timeout.
        self.shared.lock().pending.remove(&self.correlation_id);
        self.shared.slot_freed.notify_one();
        ClientError::Timeout { addr: self.shared.addr, op: self.op, waited: self.timeout }
    }
}

fn read_loop(mut stream: TcpStream, shared: &Shared) {
    let reason = loop {
        let frame = match read_frame(&mut stream) {
            Ok(frame) => frame,
            Err(reason) => break reason,
        };
        let response = match codec::decode_response(&frame) {
            Ok(response) => response,
            Err(error) => break format!("undecodable response frame: {error}"),
        };
        let complete = shared.lock().pending.remove(&response.correlation_id);
        shared.slot_freed.notify_one();
        // No completion: the request timed out and its waiter left. The frame is dropped.
        if let Some(complete) = complete {
            // Cannot block: the channel holds one frame and only this response is sent on it.
            let _ = complete.try_send(response);
        }
    };
    shared.close(reason);
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads one frame body, or says why the connection is over.
fn read_frame(stream: &mut TcpStream) -> Result<Bytes, String> {
    let mut prefix = [0u8; FRAME_PREFIX_BYTES];
    if let Err(error) = stream.read_exact(&mut prefix) {
        return Err(match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "the broker closed the connection".to_owned(),
            _ => format!("reading a response: {error}"),
        });
    }
    let body_bytes = codec::frame_body_bytes(prefix);
    if body_bytes > RESPONSE_FRAME_BYTES_MAX {
        return Err(format!(
            "response frame of {body_bytes} bytes exceeds RESPONSE_FRAME_BYTES_MAX ({RESPONSE_FRAME_BYTES_MAX})"
        ));
    }
    // Grows with what arrives, so a lying prefix costs no more memory than the bytes sent.
    let mut body = Vec::with_capacity(body_bytes.min(64 << 10));
    let read = stream.take(body_bytes as u64).read_to_end(&mut body);
    match read {
        Ok(n) if n == body_bytes => Ok(Bytes::from(body)),
        Ok(n) => Err(format!("the broker closed the connection {n} bytes into a {body_bytes}-byte frame")),
        Err(error) => Err(format!("reading a response: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{ErrorCode, Response};
    use std::net::TcpListener;

    /// A fake broker: reads request frames and hands each to `answer`, which writes replies.
    fn fake_broker<F>(answer: F) -> (SocketAddr, JoinHandle<()>)
    where
        F: FnMut(u64, Request, &mut TcpStream) -> bool + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut answer = answer;
            loop {
                let mut prefix = [0u8; 4];
                if stream.read_exact(&mut prefix).is_err() {
                    return;
                }
                let mut body = vec![0u8; codec::frame_body_bytes(prefix)];
                stream.read_exact(&mut body).unwrap();
                let (correlation_id, request) = codec::decode_request(&Bytes::from(body)).unwrap();
                if !answer(correlation_id, request, &mut stream) {
                    return;
                }
            }
        });
        (addr, handle)
    }

    fn reply(stream: &mut TcpStream, frame: &ResponseFrame) {
        let mut out = BytesMut::new();
        codec::encode_response(frame, &mut out);
        stream.write_all(&out).unwrap();
    }

    fn metadata(topics: &[&str]) -> Request {
        Request::Metadata { topics: topics.iter().map(|t| (*t).to_owned()).collect() }
    }

    fn options(request_timeout: Duration, max_in_flight: usize) -> ConnectOptions {
        ConnectOptions { connect_timeout: Duration::from_secs(2), request_timeout, max_in_flight }
    }

    #[test]
    fn pipelined_responses_are_matched_by_correlation_id() {
        // The fake holds three requests, then answers them in reverse order; each answer
        // names the topic of its request so a mismatch shows.
        let mut held = Vec::new();
        let (addr, broker) = fake_broker(move |correlation_id, request, stream| {
            let Request::CreateTopic { name, .. } = request else { panic!("{request:?}") };
            held.push((correlation_id, name));
            if held.len() == 3 {
                for (correlation_id, name) in held.drain(..).rev() {
                    reply(stream, &ResponseFrame::error(correlation_id, ErrorCode::InvalidTopic, name));
                }
            }
            true
        });
        let connection = Connection::connect(addr, options(Duration::from_secs(5), 8)).unwrap();
        let pending: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|name| {
                let request = Request::CreateTopic { name: (*name).to_owned(), partitions: 1 };
                connection.send(&request).unwrap()
            })
            .collect();
        // The fake answers all three once it holds the third, so the count can already be 0.
        assert!(connection.in_flight() <= 3);
        for (pending, name) in pending.into_iter().zip(["a", "b", "c"]) {
            let id = pending.correlation_id();
            let frame = pending.wait().unwrap();
            assert_eq!(frame.correlation_id, id);
            assert_eq!(frame.message, name);
        }
        assert_eq!(connection.in_flight(), 0);
        drop(connection);
        broker.join().unwrap();
    }

    #[test]
    fn broker_going_away_fails_pending_and_later_calls() {
        let (addr, broker) = fake_broker(|_, _, stream| {
            let _ = stream.shutdown(Shutdown::Both);
            false
        });
        let connection = Connection::connect(addr, options(Duration::from_secs(10), 8)).unwrap();
        let started = Instant::now();
        let error = connection.call(&metadata(&[])).unwrap_err();
        assert!(matches!(error, ClientError::Disconnected { .. }), "{error}");
        assert!(error.to_string().contains("closed the connection"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5), "a disconnect must not wait for the timeout");
        broker.join().unwrap();
        assert!(connection.is_closed());
        let error = connection.send(&metadata(&[])).unwrap_err();
        assert!(matches!(error, ClientError::Disconnected { .. }), "{error}");
        let error = connection.send_no_response(&metadata(&[])).unwrap_err();
        assert!(matches!(error, ClientError::Disconnected { .. }), "{error}");
    }

    #[test]
    fn an_unanswered_request_times_out_and_frees_its_slot() {
        let (addr, broker) = fake_broker(|correlation_id, request, stream| {
            // Ignore the first request; answer the rest.
            if correlation_id > 1 {
                reply(stream, &ResponseFrame::ok(correlation_id, Response::Metadata(Default::default())));
            }
            !matches!(request, Request::DeleteTopic { .. })
        });
        let connection = Connection::connect(addr, options(Duration::from_millis(200), 1)).unwrap();
        let error = connection.call(&metadata(&["slow"])).unwrap_err();
        assert!(matches!(error, ClientError::Timeout { op: "metadata", .. }), "{error}");
        // With max_in_flight 1 this only goes through if the timed-out slot was released.
        let frame = connection.call(&metadata(&["fast"])).unwrap();
        assert_eq!(frame.correlation_id, 2);
        connection.send_no_response(&Request::DeleteTopic { name: "bye".into() }).unwrap();
        broker.join().unwrap();
    }

    #[test]
    fn a_full_window_blocks_then_times_out() {
        let (addr, broker) = fake_broker(|_, _, _| true);
        let connection = Connection::connect(addr, options(Duration::from_millis(200), 2)).unwrap();
        let _first = connection.send(&metadata(&[])).unwrap();
        let _second = connection.send(&metadata(&[])).unwrap();
        let error = connection.send(&metadata(&[])).unwrap_err();
        assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
        drop(connection);
        broker.join().unwrap();
    }

    #[test]
    fn an_oversized_frame_closes_the_connection() {
        let (addr, broker) = fake_broker(|_, _, stream| {
            let prefix = u32::try_from(RESPONSE_FRAME_BYTES_MAX + 1).unwrap().to_be_bytes();
            stream.write_all(&prefix).unwrap();
            true
        });
        let connection = Connection::connect(addr, options(Duration::from_secs(10), 8)).unwrap();
        let error = connection.call(&metadata(&[])).unwrap_err();
        assert!(error.to_string().contains("RESPONSE_FRAME_BYTES_MAX"), "{error}");
        drop(connection);
        broker.join().unwrap();
    }
}
