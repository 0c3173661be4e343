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
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::{TcpListener, TcpStream};

use crate::codec::{self, ErrorCode, Request, ResponseFrame, FRAME_PREFIX_BYTES};

/// How many bytes a connection reads at once.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// Answers requests. Returns `None` when the request asked for no response (produce with
/// acks none).
pub trait Handler: 'static {
    fn handle(&self, correlation_id: u64, request: Request) -> impl Future<Output = Option<ResponseFrame>>;
}

#[derive(Debug, Clone, Copy)]
pub struct ListenerConfig {
    /// Largest request frame accepted (the length prefix's value).
    pub max_request_bytes: usize,
    /// Requests of one connection being handled at once; reading pauses beyond it.
    pub max_in_flight_per_connection: usize,
    /// Connections one shard serves at once per listener; more are closed on accept.
    pub max_connections: usize,
}

/// Binds `addr` with SO_REUSEPORT.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(std::io::Error::from)
}

/// Binds `addr` for this shard alone (no SO_REUSEPORT): a per-shard port must reach exactly one
/// shard of one node, and with SO_REUSEPORT the kernel may even hand the same ephemeral port
/// to two listeners.
pub fn bind_exclusive(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let listener = std::net::TcpListener::bind(addr)?;
    // SAFETY: the fd is a bound, listening TCP socket whose ownership moves to glommio.
    Ok(unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) })
}

/// Accepts connections, serving each in its own task, until the task running this is
/// dropped. `stop` tells the connections to read no further requests.
///
/// There is no timer racing the accept: a dropped in-flight io_uring accept can complete with
/// a connection nobody serves, so the only cancellation is the final one, at shutdown.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Rc<H>,
    config: ListenerConfig,
    stop: Rc<Cell<bool>>,
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
        if connections.get() >= config.max_connections {
            drop(stream);
            continue;
        }
        connections.set(connections.get() + 1);
        let handler = Rc::clone(&handler);
        let connections = Rc::clone(&connections);
        let stop = Rc::clone(&stop);
        glommio::spawn_local(async move {
            let _ = serve_connection(stream, handler, config, stop).await;
            connections.set(connections.get() - 1);
        })
        .detach();
    }
}

async fn serve_connection<H: Handler>(
    stream: TcpStream,
    handler: Rc<H>,
    config: ListenerConfig,
    stop: Rc<Cell<bool>>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut reader, writer) = futures_lite::io::split(stream);
    let (responses, pending) =
        local_channel::new_bounded::<ResponseFrame>(config.max_in_flight_per_connection);
    let responses = Rc::new(responses);
    let writer_task = glommio::spawn_local(write_responses(writer, pending));
    let in_flight = Rc::new(glommio::sync::Semaphore::new(config.max_in_flight_per_connection as u64));
    let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
    'connection: while !stop.get() {
        while let Some(frame) = next_frame(&mut buffer, config.max_request_bytes) {
            let body = match frame {
                Ok(body) => body,
                Err(response) => {
                    let _ = responses.send(response).await;
                    break 'connection;
                }
            };
            let (correlation_id, request) = match codec::decode_request(&body) {
                Ok(decoded) => decoded,
                Err((correlation_id, error)) => {
                    let code = match error {
                        codec::DecodeError::UnsupportedBody(_) => ErrorCode::UnsupportedRequest,
                        _ => ErrorCode::InvalidRequest,
                    };
                    let _ = responses
                        .send(ResponseFrame::error(correlation_id.unwrap_or(0), code, error.to_string()))
                        .await;
                    if correlation_id.is_none() {
                        break 'connection;
                    }
                    continue;
                }
            };
            let permit =
                Rc::clone(&in_flight).acquire_static_permit(1).await.map_err(std::io::Error::from)?;
            let handler = Rc::clone(&handler);
            let responses = Rc::clone(&responses);
            glommio::spawn_local(async move {
                if let Some(response) = handler.handle(correlation_id, request).await {
                    let _ = responses.send(response).await;
                }
                drop(permit);
            })
            .detach();
        }
        let at = buffer.len();
        buffer.resize(at + READ_CHUNK_BYTES, 0);
        let read = reader.read(&mut buffer[at..]).await;
        match read {
            Ok(0) | Err(_) => {
                buffer.truncate(at);
                break;
            }
            Ok(n) => buffer.truncate(at + n),
        }
    }
    // Let the requests already read finish and be answered, then close.
    let _ = Rc::clone(&in_flight).acquire_static_permit(config.max_in_flight_per_connection as u64).await;
    drop(responses);
    writer_task.await;
    Ok(())
}

/// Cuts the next whole frame body off `buffer`. An oversized frame yields an error response.
fn next_frame(buffer: &mut BytesMut, max_request_bytes: usize) -> Option<Result<Bytes, ResponseFrame>> {
    let prefix: [u8; FRAME_PREFIX_BYTES] =
        buffer.get(..FRAME_PREFIX_BYTES)?.try_into().expect("length checked");
    let body_bytes = codec::frame_body_bytes(prefix);
    if body_bytes > max_request_bytes {
        let message = format!(
            "request frame of {body_bytes} bytes exceeds --max-request-bytes {max_request_bytes}; closing the connection"
        );
        return Some(Err(ResponseFrame::error(0, ErrorCode::MessageTooLarge, message)));
    }
    if buffer.len() < FRAME_PREFIX_BYTES + body_bytes {
        buffer.reserve(FRAME_PREFIX_BYTES + body_bytes - buffer.len());
        return None;
    }
    let mut frame = buffer.split_to(FRAME_PREFIX_BYTES + body_bytes);
    let _ = frame.split_to(FRAME_PREFIX_BYTES);
    Some(Ok(frame.freeze()))
}

async fn write_responses(
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    pending: local_channel::LocalReceiver<ResponseFrame>,
) {
    let mut out = BytesMut::with_capacity(READ_CHUNK_BYTES);
    while let Some(response) = pending.recv().await {
        codec::encode_response(&response, &mut out);
        while let Some(Some(more)) = futures_lite::future::poll_once(pending.recv()).await {
            codec::encode_response(&more, &mut out);
        }
        if writer.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
    let _ = writer.flush().await;
}
