//! The native protocol's pipelined connection: a [`Pipeline`] with [`NativeFraming`].
//!
//! Each request frame carries a fresh correlation id (1, 2, ...) and each response frame the
//! id of the request it answers. A shard answers requests as they complete, so responses are
//! matched by id in any order ([`Matching::ById`]): a slow fetch holds back nothing behind it.
//! The connection's threads, limits, timeouts and failure handling are the [`Pipeline`]'s.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};

use super::pipeline::{self, Framing, Matching, Pipeline};
pub use super::pipeline::{
    ConnectOptions, CONNECT_TIMEOUT_DEFAULT, IN_FLIGHT_MAX_DEFAULT, REQUEST_TIMEOUT_DEFAULT,
    RESPONSE_FRAME_BYTES_MAX,
};
use super::{ClientError, Result};
use crate::codec::{self, Request, ResponseFrame};

/// A pipelined connection speaking the native protocol. Share it between threads behind an
/// `Arc`.
pub type Connection = Pipeline<NativeFraming>;

/// A native request on its way; [`PendingResponse::wait`] blocks for its response.
pub type PendingResponse = pipeline::PendingResponse<NativeFraming>;

/// The native protocol's framing: a flatbuffers envelope and raw record batches (see
/// [`crate::codec`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeFraming;

impl Framing for NativeFraming {
    type Request<'a> = &'a Request;
    type Response = ResponseFrame;
    type Expected = ();

    const MATCHING: Matching<NativeFraming> = Matching::ById(decode_response);
    const READER_NAME: &'static str = "pyralog-conn";
    const CORRELATION_ID_FIRST: u64 = 1;

    fn op(request: &Request) -> &'static str {
        request.kind()
    }

    fn encode(&self, correlation_id: u64, request: &Request, buf: &mut BytesMut) -> Result<()> {
        codec::encode_request(correlation_id, request, buf);
        Ok(())
    }
}

impl Connection {
    /// Connects to one broker port. Name resolution is the caller's (see [`super::Client`]).
    pub fn connect(addr: SocketAddr, options: ConnectOptions) -> Result<Connection, ClientError> {
        Pipeline::open(addr, options, NativeFraming)
    }
}

fn decode_response(frame: Bytes) -> Result<(u64, ResponseFrame), String> {
    let response =
        codec::decode_response(&frame).map_err(|error| format!("undecodable response frame: {error}"))?;
    Ok((response.correlation_id, response))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::codec::{ErrorCode, Response};

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
        ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout,
            max_in_flight,
            ..ConnectOptions::default()
        }
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
                let request = Request::CreateTopic {
                    name: (*name).to_owned(),
                    partitions: 1,
                    replication_factor: 0,
                    min_insync_replicas: 0,
                };
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
