//! A small HTTP/1.1 server for the operator's endpoints (`/metrics`, `/health`, `/config`):
//! GET and HEAD only, one request per connection (answered with `Connection: close`), a
//! bounded request head and a bounded number of connections. Enough for Prometheus, curl,
//! load balancers' health checks and supervisors; not a general web server.
//!
//! It runs on one shard's executor; what each path answers is the daemon's [`HttpHandler`].

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

/// Largest request head (request line and headers); larger ones get 431 and a close.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// Connections served at once; more get 503 and a close.
pub const CONNECTIONS_MAX: usize = 64;
/// A client has this long to send its whole request head: a client trickling bytes cannot
/// hold a connection slot longer.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A response must be taken within this: a scraper that stops reading frees its slot.
pub const RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer: status code, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl HttpResponse {
    pub fn text(status: u16, body: impl Into<String>) -> HttpResponse {
        HttpResponse { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }
}

/// Answers a GET of `path` (without its query string).
pub trait HttpHandler: 'static {
    fn get(&self, path: &str) -> impl Future<Output = HttpResponse>;
}

/// Accepts connections until the task running this is dropped.
pub async fn serve<H: HttpHandler>(listener: TcpListener, handler: Rc<H>) {
    let connections = Rc::new(Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("pyralog: metrics listener: accept failed: {error}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        connections.set(connections.get() + 1);
        let busy = connections.get() > CONNECTIONS_MAX;
        let (handler, connections) = (Rc::clone(&handler), Rc::clone(&connections));
        glommio::spawn_local(async move {
            let _ = match busy {
                true => refuse_busy(stream).await,
                false => serve_connection(stream, handler).await,
            };
            connections.set(connections.get() - 1);
        })
        .detach();
    }
}

async fn serve_connection<H: HttpHandler>(mut stream: TcpStream, handler: Rc<H>) -> std::io::Result<()> {
    let head = futures_lite::future::or(read_head(&mut stream), async {
        glommio::timer::sleep(REQUEST_HEAD_TIMEOUT).await;
        Err(std::io::ErrorKind::TimedOut.into())
    })
    .await?;
    let response = match head {
        Head::Complete(head) => match parse_request_line(&head) {
            Ok((method, path)) => {
                let mut response = handler.get(path).await;
                if method == "HEAD" {
                    response.body.clear();
                }
                response
            }
            Err(response) => response,
        },
        Head::TooLarge => {
            HttpResponse::text(431, format!("request head over {REQUEST_HEAD_BYTES_MAX} bytes\n"))
        }
        Head::Closed => return Ok(()),
    };
    send(&mut stream, &response).await
}

/// Answers 503 without reading the request: every slot is taken.
async fn refuse_busy(mut stream: TcpStream) -> std::io::Result<()> {
    let response = HttpResponse::text(503, format!("busy: {CONNECTIONS_MAX} connections are being served\n"));
    send(&mut stream, &response).await
}

async fn send(stream: &mut TcpStream, response: &HttpResponse) -> std::io::Result<()> {
    stream.set_write_timeout(Some(RESPONSE_WRITE_TIMEOUT))?;
    stream.write_all(&encode(response)).await?;
    stream.close().await
}

enum Head {
    /// The request line and headers, without the blank line.
    Complete(Vec<u8>),
    TooLarge,
    /// The client closed before a whole head arrived.
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            return Ok(Head::Complete(head));
        }
        if head.len() > REQUEST_HEAD_BYTES_MAX {
            return Ok(Head::TooLarge);
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(Head::Closed);
        }
        head.extend_from_slice(&chunk[..read]);
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The method and the path (query string dropped) of a GET or HEAD request.
fn parse_request_line(head: &[u8]) -> Result<(&str, &str), HttpResponse> {
    let text =
        std::str::from_utf8(head).map_err(|_| HttpResponse::text(400, "request head is not UTF-8\n"))?;
    let line = text.lines().next().unwrap_or_default();
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next()) else {
        return Err(HttpResponse::text(400, "malformed request line\n"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpResponse::text(505, "only HTTP/1.x is served\n"));
    }
    if method != "GET" && method != "HEAD" {
        return Err(HttpResponse::text(405, format!("{method} is not served: use GET\n")));
    }
    Ok((method, target.split('?').next().unwrap_or(target)))
}

fn encode(response: &HttpResponse) -> Vec<u8> {
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    out.extend_from_slice(response.body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_parsed_and_refused_with_a_status() {
        assert_eq!(parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a").unwrap(), ("GET", "/metrics"));
        assert_eq!(parse_request_line(b"HEAD /health HTTP/1.0").unwrap(), ("HEAD", "/health"));
        assert_eq!(parse_request_line(b"POST /metrics HTTP/1.1").unwrap_err().status, 405);
        assert_eq!(parse_request_line(b"GET /metrics SPDY/3").unwrap_err().status, 505);
        assert_eq!(parse_request_line(b"GARBAGE").unwrap_err().status, 400);
    }

    #[test]
    fn a_response_carries_its_length_and_closes() {
        let bytes = encode(&HttpResponse::text(503, "not ready\n"));
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
        assert!(text.contains("Content-Length: 10\r\n") && text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\nnot ready\n"));
    }
}
