//! A small blocking Kafka protocol client over the generated codecs: one connection, requests
//! pipelined, responses read in order (as Kafka brokers answer). The load generator's
//! `--protocol kafka` and the daemon's tests use it; applications should use a full Kafka
//! client library.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;

use crate::kafka::messages::request_header::RequestHeader;
use crate::kafka::wire::{DecodeError, EncodeError};
use crate::kafka::{self, RequestBody, ResponseBody};

#[derive(Debug, thiserror::Error)]
pub enum KafkaClientError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding the request: {0}")]
    Encode(#[from] EncodeError),
    #[error("decoding the response: {0}")]
    Decode(#[from] DecodeError),
    #[error("response {got} arrived while {expected} was expected")]
    OutOfOrder { expected: i32, got: i32 },
    #[error("response frame of {0} bytes is not a frame")]
    BadFrame(i32),
}

/// Largest response accepted.
const RESPONSE_BYTES_MAX: i32 = 256 << 20;

pub struct KafkaConnection {
    stream: TcpStream,
    client_id: String,
    next_correlation_id: i32,
    /// Requests sent and not answered yet: (correlation id, API key, version).
    in_flight: std::collections::VecDeque<(i32, i16, i16)>,
}

impl KafkaConnection {
    pub fn connect(addr: &str, client_id: &str) -> Result<KafkaConnection, KafkaClientError> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(KafkaConnection {
            stream,
            client_id: client_id.to_owned(),
            next_correlation_id: 0,
            in_flight: Default::default(),
        })
    }

    /// Sends a request without waiting for its response.
    pub fn send(&mut self, version: i16, body: &RequestBody) -> Result<i32, KafkaClientError> {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        let header = RequestHeader {
            request_api_key: body.api_key(),
            request_api_version: version,
            correlation_id,
            client_id: Some(self.client_id.clone()),
        };
        let frame = kafka::encode_request(&header, body)?;
        self.stream.write_all(&frame)?;
        self.in_flight.push_back((correlation_id, body.api_key(), version));
        Ok(correlation_id)
    }

    /// Requests sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Reads the response to the oldest request in flight.
    pub fn receive(&mut self) -> Result<ResponseBody, KafkaClientError> {
        let (expected, api_key, version) =
            self.in_flight.pop_front().expect("receive is called with a request in flight");
        let mut prefix = [0u8; 4];
        self.stream.read_exact(&mut prefix)?;
        let size = i32::from_be_bytes(prefix);
        if !(0..=RESPONSE_BYTES_MAX).contains(&size) {
            return Err(KafkaClientError::BadFrame(size));
        }
        let mut frame = vec![0u8; size as usize];
        self.stream.read_exact(&mut frame)?;
        let (got, body) = kafka::decode_response(api_key, version, Bytes::from(frame))?;
        if got != expected {
            return Err(KafkaClientError::OutOfOrder { expected, got });
        }
        Ok(body)
    }

    /// Sends a request and waits for its response.
    pub fn call(&mut self, version: i16, body: RequestBody) -> Result<ResponseBody, KafkaClientError> {
        assert_eq!(self.in_flight.len(), 0, "call is not mixed with pipelined requests");
        self.send(version, &body)?;
        self.receive()
    }

    /// Sends raw bytes, for tests of bad input.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Whether the broker closed the connection within `timeout`.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(timeout));
        let mut byte = [0u8; 1];
        let closed = matches!(self.stream.read(&mut byte), Ok(0));
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(60)));
        closed
    }
}
