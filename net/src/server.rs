//! The per-shard listener of the native protocol (glommio).
//!
//! Each shard binds the shared port (SO_REUSEPORT, so the kernel spreads connections over the
//! shards) and a port of its own. A connection reads frames, hands each decoded request to the
//! daemon's [`Handler`] in a task of its own (requests on one connection are pipelined), and a
//! writer task sends responses as they complete, coalescing those that are ready into one write.
//! Clients match responses to requests by correlation id.
//!
//! Bad input never takes the node down: a frame over `max_request_bytes` gets an error
//! response and the connection is closed (its remaining bytes cannot be trusted to be frames);
//! a frame whose envelope is unreadable gets an error response and a close; a readable request
//! of an unknown or malformed kind gets an error response and the connection goes on.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::{TcpListener, TcpStream};

use crate::codec::{self, ErrorCode, Request, ResponseFrame, FRAME_PREFIX_BYTES};
use crate::kafka::{self, wire::Writer};
pub use crate::listener_metrics::{Api, ListenerMetrics, ServerMetrics};
pub use crate::ports::Sharing;

/// How many bytes a connection reads at once.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Bytes of a read that may wait for data. That read goes through glommio, into zeroed
/// memory; when it comes back full, whatever else has arrived is taken without waiting,
/// straight into the buffer's spare room (see [`recv_now`]): large requests are neither
/// zeroed first nor read 64 KiB per system call.
const WAITING_READ_BYTES: usize = 4 << 10;

/// Answers requests. Returns `None` when the request asked for no response (produce with
/// acks none).
pub trait Handler: 'static {
    fn handle(&self, correlation_id: u64, request: Request) -> impl Future<Output = Option<ResponseFrame>>;
}

#[derive(Debug, Clone, Copy)]
pub struct ListenerConfig {
    /// Requests of one connection being handled at once; reading pauses beyond it.
    pub max_in_flight_per_connection: usize,
    /// Connections one shard serves at once per listener; more are closed on accept.
    pub max_connections: usize,
}

/// Binds `addr` with the options of every listener (`ports::bind`) for glommio to accept on.
pub fn bind(addr: SocketAddr, sharing: Sharing) -> std::io::Result<TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let listener = crate::ports::bind(addr, sharing)?;
    // SAFETY: the fd is a bound, listening TCP socket whose ownership moves to glommio.
    Ok(unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) })
}

/// How a listener speaks one protocol: cutting frames, decoding requests, answering them and
/// encoding responses. The accept and connection loops are shared by every protocol.
pub trait Protocol: 'static {
    type Request: 'static;
    type Response: 'static;
    /// Whether responses must leave in request order (Kafka clients require it; the native
    /// protocol matches by correlation id, so a long-poll fetch does not hold back the rest).
    const ORDERED: bool;

    /// Cuts the next whole frame off `buffer`: `None` until one is complete, or an error to
    /// send (if any) before closing, for a frame that cannot be read.
    fn next_frame(&self, buffer: &mut BytesMut) -> Option<Result<Bytes, Option<Self::Response>>>;
    fn decode(&self, frame: Bytes) -> Decoded<Self::Request, Self::Response>;
    /// The request's API, for metrics.
    fn api(&self, request: &Self::Request) -> Api;
    /// Answers `request`, which came from the client at `peer`.
    fn handle(
        &self,
        request: Self::Request,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<Self::Response>>;
    /// Appends the response's frame to `out`; an error closes the connection.
    fn encode(&self, response: Self::Response, out: &mut Writer) -> Result<(), String>;
}

pub enum Decoded<Req, Resp> {
    Request(Req),
    /// Answer with this and read on.
    Reply(Resp),
    /// Answer with this, if anything, and close the connection.
    Close(Option<Resp>),
}

/// The native protocol over a [`Handler`].
pub struct Native<H> {
    pub handler: H,
    pub max_request_bytes: usize,
}

impl<H: Handler> Protocol for Native<H> {
    type Request = (u64, Request);
    type Response = ResponseFrame;
    const ORDERED: bool = false;

    fn next_frame(&self, buffer: &mut BytesMut) -> Option<Result<Bytes, Option<ResponseFrame>>> {
        let prefix: [u8; FRAME_PREFIX_BYTES] =
            buffer.get(..FRAME_PREFIX_BYTES)?.try_into().expect("length checked");
        let body_bytes = codec::frame_body_bytes(prefix);
        if body_bytes > self.max_request_bytes {
            let message = format!(
                "request frame of {body_bytes} bytes exceeds --max-request-bytes {}; closing the connection",
                self.max_request_bytes
            );
            return Some(Err(Some(ResponseFrame::error(0, ErrorCode::MessageTooLarge, message))));
        }
        cut_frame(buffer, FRAME_PREFIX_BYTES, body_bytes).map(Ok)
    }

    fn decode(&self, frame: Bytes) -> Decoded<(u64, Request), ResponseFrame> {
        match codec::decode_request(&frame) {
            Ok(decoded) => Decoded::Request(decoded),
            Err((correlation_id, error)) => {
                let code = match error {
                    codec::DecodeError::UnsupportedBody(_) => ErrorCode::UnsupportedRequest,
                    _ => ErrorCode::InvalidRequest,
                };
                let response = ResponseFrame::error(correlation_id.unwrap_or(0), code, error.to_string());
                match correlation_id {
                    Some(_) => Decoded::Reply(response),
                    // A native frame would not be read by a Kafka client: say why, and close.
                    None if wrong_protocol::is_kafka_request(&frame) => {
                        if !wrong_protocol::is_probe(&frame) {
                            wrong_protocol::report(wrong_protocol::Seen::KafkaOnNative);
                        }
                        Decoded::Close(None)
                    }
                    None => Decoded::Close(Some(response)),
                }
            }
        }
    }

    fn api(&self, (_, request): &(u64, Request)) -> Api {
        Api {
            index: request.kind_index(),
            timed: matches!(request, Request::Produce(_) | Request::Fetch(_)),
            name: Request::kind_of_index,
        }
    }

    async fn handle(
        &self,
        (correlation_id, request): (u64, Request),
        _: SocketAddr,
    ) -> Option<ResponseFrame> {
        self.handler.handle(correlation_id, request).await
    }

    fn encode(&self, response: ResponseFrame, out: &mut Writer) -> Result<(), String> {
        // Batches from the log or the cache are sent from their own buffers (large ones are
        // not copied; see `Writer::shared`).
        for chunk in codec::encode_response_head(&response, out.buffer_mut()) {
            out.shared(chunk);
        }
        Ok(())
    }
}

/// Frames at least this large get an allocation of their own (see [`cut_frame`]).
const FRAME_ALONE_BYTES: usize = 64 << 10;

/// Splits `prefix + body` bytes off `buffer` once they are all there, returning the body.
///
/// A large frame gets an allocation of exactly its size (and the bytes read past it, if any,
/// move to a new buffer), so the log can stamp offsets into the produced batches in place
/// instead of copying them (`Bytes::try_into_mut` succeeds when nothing else shares the
/// allocation) without the stored batches pinning more memory than their own bytes.
pub fn cut_frame(buffer: &mut BytesMut, prefix: usize, body: usize) -> Option<Bytes> {
    if buffer.len() < prefix + body {
        if body >= FRAME_ALONE_BYTES && buffer.capacity() < prefix + body {
            // Exactly the frame's size: the reads fill it without growing it (a regrowth
            // copies) and stop at its end, and the frame holds no memory beyond itself.
            let mut exact = BytesMut::with_capacity(prefix + body);
            exact.extend_from_slice(buffer);
            *buffer = exact;
        } else {
            buffer.reserve(prefix + body - buffer.len());
        }
        return None;
    }
    let mut frame = buffer.split_to(prefix + body);
    let _ = frame.split_to(prefix);
    if body >= FRAME_ALONE_BYTES {
        *buffer = BytesMut::from(&buffer[..]);
    }
    Some(frame.freeze())
}

/// Accepts connections, serving each in its own task, until the task running this is
/// dropped. `stop` tells the connections to read no further requests.
///
/// There is no timer racing the accept: a dropped in-flight io_uring accept can complete with
/// a connection nobody serves, so the only cancellation is the final one, at shutdown.
pub async fn serve<P: Protocol>(
    listener: TcpListener,
    protocol: Rc<P>,
    config: ListenerConfig,
    stop: Rc<Cell<bool>>,
    metrics: Rc<ListenerMetrics>,
) {
    let connections = Rc::new(Cell::new(0usize));
    loop {
        let accepted = listener.accept().await;
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("pyralog: accept failed: {error}");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        metrics.connections_accepted.inc();
        if connections.get() >= config.max_connections {
            drop(stream);
            continue;
        }
        connections.set(connections.get() + 1);
        metrics.connections.inc();
        let protocol = Rc::clone(&protocol);
        let connections = Rc::clone(&connections);
        let stop = Rc::clone(&stop);
        let metrics = Rc::clone(&metrics);
        glommio::spawn_local(async move {
            let _ = serve_connection(stream, protocol, config, stop, Rc::clone(&metrics)).await;
            connections.set(connections.get() - 1);
            metrics.connections.dec();
        })
        .detach();
    }
}

/// What the writer task receives: a response ready now, or (ordered protocols) the task that
/// will produce the next one.
enum Outgoing<R> {
    Ready(R, Api),
    Pending(glommio::Task<Option<R>>, Api),
}

async fn serve_connection<P: Protocol>(
    stream: TcpStream,
    protocol: Rc<P>,
    config: ListenerConfig,
    stop: Rc<Cell<bool>>,
    metrics: Rc<ListenerMetrics>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let fd = stream.as_raw_fd();
    let (mut reader, writer) = futures_lite::io::split(stream);
    let (responses, pending) =
        local_channel::new_bounded::<Outgoing<P::Response>>(config.max_in_flight_per_connection);
    let responses = Rc::new(responses);
    let writer_task =
        glommio::spawn_local(write_responses(writer, pending, Rc::clone(&protocol), Rc::clone(&metrics)));
    let in_flight = Rc::new(glommio::sync::Semaphore::new(config.max_in_flight_per_connection as u64));
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    'connection: while !stop.get() {
        while let Some(frame) = protocol.next_frame(&mut buffer) {
            let frame_bytes = frame.as_ref().map_or(0, |body| body.len() + FRAME_PREFIX_BYTES);
            let request = match frame.map(|body| protocol.decode(body)) {
                Ok(Decoded::Request(request)) => request,
                Ok(Decoded::Reply(response)) => {
                    metrics.request(Api::UNREADABLE, frame_bytes);
                    let _ = responses.send(Outgoing::Ready(response, Api::UNREADABLE)).await;
                    continue;
                }
                Ok(Decoded::Close(response)) | Err(response) => {
                    metrics.request(Api::UNREADABLE, frame_bytes);
                    if let Some(response) = response {
                        let _ = responses.send(Outgoing::Ready(response, Api::UNREADABLE)).await;
                    }
                    break 'connection;
                }
            };
            let api = protocol.api(&request);
            metrics.request(api, frame_bytes);
            let permit =
                Rc::clone(&in_flight).acquire_static_permit(1).await.map_err(std::io::Error::from)?;
            let protocol = Rc::clone(&protocol);
            let metrics = Rc::clone(&metrics);
            let started = std::time::Instant::now();
            if P::ORDERED {
                let task = glommio::spawn_local(async move {
                    let response = protocol.handle(request, peer).await;
                    metrics.answered(api, started.elapsed());
                    drop(permit);
                    response
                });
                let _ = responses.send(Outgoing::Pending(task, api)).await;
            } else {
                let responses = Rc::clone(&responses);
                glommio::spawn_local(async move {
                    let response = protocol.handle(request, peer).await;
                    metrics.answered(api, started.elapsed());
                    if let Some(response) = response {
                        let _ = responses.send(Outgoing::Ready(response, api)).await;
                    }
                    drop(permit);
                })
                .detach();
            }
        }
        match read_more(&mut reader, fd, &mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // Let the requests already read finish and be answered, then close.
    let _ = Rc::clone(&in_flight).acquire_static_permit(config.max_in_flight_per_connection as u64).await;
    drop(responses);
    writer_task.await;
    Ok(())
}

/// Reads what the socket `fd` (read through `reader`) has into `buffer`, waiting until
/// something arrives. Returns the bytes the waiting read took: 0 when the peer closed.
pub(crate) async fn read_more(
    reader: &mut (impl futures_lite::AsyncRead + Unpin),
    fd: RawFd,
    buffer: &mut BytesMut,
) -> std::io::Result<usize> {
    let at = buffer.len();
    // Read into the room already reserved for an incomplete frame (growing the buffer
    // there would copy what it holds), else into a fresh chunk.
    let room = buffer.capacity() - at;
    let chunk = if room > 0 { room.min(READ_CHUNK_BYTES) } else { READ_CHUNK_BYTES };
    buffer.reserve(chunk);
    let waiting = chunk.min(WAITING_READ_BYTES);
    buffer.resize(at + waiting, 0);
    let read = reader.read(&mut buffer[at..]).await;
    buffer.truncate(at + *read.as_ref().unwrap_or(&0));
    // A full waiting read: more is likely there. Take it all at once, into all the room
    // there is (a large frame has its whole size reserved). A socket that turns out empty,
    // closed or failed is left for the next waiting read, which reports it.
    if read.as_ref().is_ok_and(|&n| n == waiting) && chunk > waiting {
        let _ = recv_now(fd, buffer);
    }
    read
}

/// Takes what the socket holds right now, up to `buffer`'s spare capacity, which the kernel
/// writes directly (nothing is zeroed first). `Ok(None)`: nothing there; `Ok(Some(0))`: the
/// peer closed. Never waits. Reading the socket beside glommio's reads keeps the bytes in
/// order only because its `TcpStream` is unbuffered: a `.buffered()` stream would hold bytes
/// this would skip.
fn recv_now(fd: RawFd, buffer: &mut BytesMut) -> std::io::Result<Option<usize>> {
    let spare = buffer.spare_capacity_mut();
    let len = spare.len();
    // SAFETY: `spare` is valid for writes of `len` bytes, and recv writes at most `len`.
    let received = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), len, libc::MSG_DONTWAIT) };
    let Ok(received) = usize::try_from(received) else {
        let error = std::io::Error::last_os_error();
        return match error.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
            _ => Err(error),
        };
    };
    // SAFETY: recv initialized the first `received` bytes of the spare capacity.
    unsafe { buffer.set_len(buffer.len() + received) };
    Ok(Some(received))
}

async fn write_responses<P: Protocol>(
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    pending: local_channel::LocalReceiver<Outgoing<P::Response>>,
    protocol: Rc<P>,
    metrics: Rc<ListenerMetrics>,
) {
    use futures_lite::future::poll_once;
    // Responses that are ready are encoded together and written when nothing more is ready.
    let mut out = Writer::new();
    loop {
        let next = match poll_once(pending.recv()).await {
            Some(Some(next)) => next,
            Some(None) => break,
            None => {
                if send(&mut writer, &mut out).await.is_err() {
                    return;
                }
                match pending.recv().await {
                    Some(next) => next,
                    None => break,
                }
            }
        };
        let (response, api) = match next {
            Outgoing::Ready(response, api) => (Some(response), api),
            Outgoing::Pending(mut task, api) => match poll_once(&mut task).await {
                Some(response) => (response, api),
                None => {
                    if send(&mut writer, &mut out).await.is_err() {
                        return;
                    }
                    (task.await, api)
                }
            },
        };
        if let Some(response) = response {
            let before = out.len();
            if let Err(error) = protocol.encode(response, &mut out) {
                eprintln!("pyralog: cannot encode a response, closing the connection: {error}");
                return;
            }
            metrics.response(api, out.len() - before);
        }
    }
    if send(&mut writer, &mut out).await.is_ok() {
        let _ = writer.flush().await;
    }
}

async fn send(writer: &mut futures_lite::io::WriteHalf<TcpStream>, out: &mut Writer) -> std::io::Result<()> {
    for chunk in std::mem::take(out).finish() {
        writer.write_all(&chunk).await?;
    }
    Ok(())
}

/// Answers Kafka requests. Returns `None` when the request asked for no response (produce
/// with acks 0).
pub trait KafkaHandler: 'static {
    /// Answers `request` from the client at `peer`.
    fn handle(
        &self,
        request: kafka::Request,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<kafka::ResponseBody>>;
}

/// The Kafka wire protocol over a [`KafkaHandler`].
///
/// Kafka clients require responses in request order, so requests of a connection are handled
/// concurrently but answered in order. A frame that cannot be a request (over
/// `max_request_bytes`, negative, too short, an unknown API, a version that is not served, or
/// a body that does not decode) closes the connection, as Kafka brokers do; an ApiVersions
/// request of an unknown version instead gets error 35 in a v0 body, so that a newer client
/// learns which versions to use.
pub struct Kafka<H> {
    pub handler: H,
    pub max_request_bytes: usize,
}

pub struct KafkaResponse {
    api_key: i16,
    version: i16,
    correlation_id: i32,
    body: KafkaBody,
}

enum KafkaBody {
    Body(kafka::ResponseBody),
    Encoded(Vec<Bytes>),
}

impl<H: KafkaHandler> Protocol for Kafka<H> {
    type Request = kafka::Request;
    type Response = KafkaResponse;
    const ORDERED: bool = true;

    fn next_frame(&self, buffer: &mut BytesMut) -> Option<Result<Bytes, Option<KafkaResponse>>> {
        let prefix: [u8; kafka::FRAME_PREFIX_BYTES] =
            buffer.get(..kafka::FRAME_PREFIX_BYTES)?.try_into().expect("length checked");
        let size = i32::from_be_bytes(prefix);
        if size < 0 || size as usize > self.max_request_bytes {
            return Some(Err(None));
        }
        cut_frame(buffer, kafka::FRAME_PREFIX_BYTES, size as usize).map(Ok)
    }

    fn decode(&self, frame: Bytes) -> Decoded<kafka::Request, KafkaResponse> {
        let prefix = kafka::RequestPrefix::peek(&frame);
        match kafka::decode_request(frame.clone()) {
            Ok(request) => Decoded::Request(request),
            Err(kafka::RequestError::UnsupportedVersion { api_key: kafka::api::API_VERSIONS, version }) => {
                let correlation_id = prefix.map_or(0, |p| p.correlation_id);
                Decoded::Reply(KafkaResponse {
                    api_key: kafka::api::API_VERSIONS,
                    version,
                    correlation_id,
                    body: KafkaBody::Encoded(kafka::api_versions_unsupported(correlation_id)),
                })
            }
            Err(_) => {
                if codec::decode_request(&frame).is_ok() {
                    wrong_protocol::report(wrong_protocol::Seen::NativeOnKafka);
                }
                Decoded::Close(None)
            }
        }
    }

    fn api(&self, request: &kafka::Request) -> Api {
        let key = request.header.request_api_key;
        // Only keys Kafka defines decode, all far below the unreadable slot.
        let index = u8::try_from(key).ok().filter(|&index| index < u8::MAX).unwrap_or(u8::MAX);
        let name = |index| kafka::api_name(i16::from(index)).unwrap_or("unknown");
        Api { index, timed: key == kafka::api::PRODUCE || key == kafka::api::FETCH, name }
    }

    async fn handle(&self, request: kafka::Request, peer: SocketAddr) -> Option<KafkaResponse> {
        let (api_key, version, correlation_id) = (
            request.header.request_api_key,
            request.header.request_api_version,
            request.header.correlation_id,
        );
        let body = self.handler.handle(request, peer).await?;
        Some(KafkaResponse { api_key, version, correlation_id, body: KafkaBody::Body(body) })
    }

    fn encode(&self, response: KafkaResponse, out: &mut Writer) -> Result<(), String> {
        let chunks = match response.body {
            KafkaBody::Encoded(chunks) => chunks,
            KafkaBody::Body(body) => {
                kafka::encode_response(response.api_key, response.version, response.correlation_id, &body)
                    .map_err(|e| format!("API key {} v{}: {e}", response.api_key, response.version))?
            }
        };
        for chunk in chunks {
            out.shared(chunk);
        }
        Ok(())
    }
}

/// A client of one protocol on the other's listener: the node closes its connection, as it
/// does for any frame it cannot read, and says on stderr what happened and where that client
/// belongs, at most once per [`REPORT_INTERVAL`] and shard (a misconfigured client that keeps
/// reconnecting does not flood the log). Only frames that fail to decode are looked at, so the
/// check costs nothing on the request path. The client library's protocol probe
/// (`client::probe`, sent after a failed first request) is not reported when it can be told
/// apart: its Kafka request carries [`PROBE_CLIENT_ID`]; its native one cannot carry a mark.
mod wrong_protocol {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    pub use crate::client::PROBE_CLIENT_ID;

    /// Shortest time between two reports of one shard.
    pub const REPORT_INTERVAL: Duration = Duration::from_secs(60);

    /// Which listener saw a client of the other protocol.
    #[derive(Debug, Clone, Copy)]
    pub enum Seen {
        KafkaOnNative,
        NativeOnKafka,
    }

    thread_local! {
        /// When this shard last reported each kind.
        static LAST_REPORTS: Cell<[Option<Instant>; 2]> = const { Cell::new([None; 2]) };
    }

    /// Says what was seen, unless this shard said it within [`REPORT_INTERVAL`].
    pub fn report(seen: Seen) {
        let now = Instant::now();
        let mut last = LAST_REPORTS.with(Cell::get);
        let at = &mut last[seen as usize];
        if at.is_some_and(|at| now.duration_since(at) < REPORT_INTERVAL) {
            return;
        }
        *at = Some(now);
        LAST_REPORTS.with(|reports| reports.set(last));
        let line = match seen {
            Seen::KafkaOnNative => KAFKA_ON_NATIVE,
            Seen::NativeOnKafka => NATIVE_ON_KAFKA,
        };
        eprintln!("{line} (said at most once a minute)");
    }

    /// Whether a Kafka request header names the client library's protocol probe.
    pub fn is_probe(frame: &[u8]) -> bool {
        let id = PROBE_CLIENT_ID.as_bytes();
        let Some(length) = frame.get(8..KAFKA_HEADER_BYTES) else { return false };
        i16::from_be_bytes([length[0], length[1]]) as usize == id.len()
            && frame.get(KAFKA_HEADER_BYTES..KAFKA_HEADER_BYTES + id.len()) == Some(id)
    }

    /// Highest Kafka API key and version taken for a Kafka request header (Kafka's own stay
    /// below 100 and 20). A native frame opens with its envelope's length, which read as key
    /// and version gives key 0 and a version of that length, over 30 for any envelope.
    const KAFKA_API_KEY_MAX: i16 = 100;
    const KAFKA_API_VERSION_MAX: i16 = 30;
    /// api_key, api_version, correlation_id, client id length.
    const KAFKA_HEADER_BYTES: usize = 10;

    pub const KAFKA_ON_NATIVE: &str = "pyralog: a Kafka client connected to the native listener \
        (--listen); closing its connection. Kafka clients connect to the Kafka listener \
        (--kafka-listen, default 127.0.0.1:9092)";
    pub const NATIVE_ON_KAFKA: &str = "pyralog: a native Pyralog client connected to the Kafka \
        listener (--kafka-listen); closing its connection. Native clients connect to the native \
        listener (--listen, default 127.0.0.1:7070)";

    /// Whether a frame body that is not a native request reads as a Kafka request header:
    /// API key and version in Kafka's ranges, and a client id (nullable string) that fits.
    pub fn is_kafka_request(frame: &[u8]) -> bool {
        let Some(header) = frame.get(..KAFKA_HEADER_BYTES) else { return false };
        let field = |at: usize| i16::from_be_bytes([header[at], header[at + 1]]);
        let (api_key, api_version, client_id_bytes) = (field(0), field(2), field(8));
        let client_id_fits = client_id_bytes == -1
            || usize::try_from(client_id_bytes).is_ok_and(|bytes| bytes <= frame.len() - KAFKA_HEADER_BYTES);
        (0..=KAFKA_API_KEY_MAX).contains(&api_key)
            && (0..=KAFKA_API_VERSION_MAX).contains(&api_version)
            && client_id_fits
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::codec::{self, Request};
        use crate::kafka::{self, messages::request_header::RequestHeader, RequestBody};

        fn kafka_frame(api_key: i16, version: i16, client_id: Option<&str>) -> Vec<u8> {
            let header = RequestHeader {
                request_api_key: api_key,
                request_api_version: version,
                correlation_id: 7,
                client_id: client_id.map(str::to_owned),
            };
            let frame =
                kafka::encode_request(&header, &RequestBody::ApiVersions(Default::default())).unwrap();
            frame[kafka::FRAME_PREFIX_BYTES..].to_vec()
        }

        #[test]
        fn kafka_request_headers_are_recognised_and_native_frames_are_not() {
            assert!(is_kafka_request(&kafka_frame(kafka::api::API_VERSIONS, 3, Some("rdkafka"))));
            assert!(is_kafka_request(&kafka_frame(kafka::api::API_VERSIONS, 0, None)));
            let mut native = bytes::BytesMut::new();
            codec::encode_request(1, &Request::Metadata { topics: vec!["t".repeat(200)] }, &mut native);
            assert!(!is_kafka_request(&native[codec::FRAME_PREFIX_BYTES..]));
            assert!(!is_kafka_request(&[0, 18, 0, 3]), "too short for a header");
            let mut lying = kafka_frame(kafka::api::API_VERSIONS, 3, Some("id"));
            lying[8..10].copy_from_slice(&500i16.to_be_bytes());
            assert!(!is_kafka_request(&lying), "a client id longer than the frame");
        }
    }
}
