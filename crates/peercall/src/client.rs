//! A minimal HTTP/1.1 client for a local node's admin API, used by the CLI
//! subcommands and the demo: one request per connection (`Connection: close`),
//! bounded by a timeout, no dependencies beyond tokio.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response read: admin answers are a few kilobytes (a full contact list
/// with presence or a supernode's metrics stay far below this).
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

/// Why a request failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nothing listens there.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The admin address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("{method} {path} on {addr}: {source}")]
    Io {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// The admin address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// No complete answer in time.
    #[error("{method} {path} on {addr}: no answer within {timeout:?}")]
    Timeout {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// The admin address.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// Not an HTTP response we understand.
    #[error("{method} {path} on {addr}: bad response: {reason}")]
    BadResponse {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// The admin address.
        addr: SocketAddr,
        /// What is wrong.
        reason: &'static str,
    },
}

/// A response: status code and body text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (de-chunked).
    pub body: String,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error` field of a JSON error body, or the body itself.
    pub fn error_message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| self.body.trim().to_owned())
    }
}

/// One request: `token` adds the bearer header, `body` is sent as JSON.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        method: method.to_owned(),
        path: path.to_owned(),
        addr,
        source,
    };
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n{auth}\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .await
            .map_err(io)?;
        Ok(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout {
            method: method.to_owned(),
            path: path.to_owned(),
            addr,
            timeout,
        })??;
    parse_response(&raw).map_err(|reason| ClientError::BadResponse {
        method: method.to_owned(),
        path: path.to_owned(),
        addr,
        reason,
    })
}

/// Parses an HTTP/1.1 response (plain or chunked body).
pub fn parse_response(raw: &[u8]) -> Result<Response, &'static str> {
    let text = std::str::from_utf8(raw).map_err(|_| "not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of headers")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("no status code")?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(Response { status, body })
}

/// Decodes a chunked body.
fn dechunk(mut rest: &str) -> Result<String, &'static str> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("chunk without size")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).ok_or("short chunk")?);
        rest = after.get(size + 2..).ok_or("chunk without end")?;
    }
}

/// One server-sent event: its `event:` kind and `data:` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The kind (`message` when the server named none).
    pub kind: String,
    /// The data lines, joined with newlines.
    pub data: String,
}

/// Longest event accepted from the stream: far above any event the node sends (a
/// call's end with its statistics is a few kilobytes).
const MAX_EVENT: usize = 1024 * 1024;

/// A subscription to a node's `GET /v1/events` stream (chunked HTTP/1.1).
pub struct EventStream {
    reader: tokio::io::BufReader<TcpStream>,
    /// Text received and not yet parsed into events.
    pending: String,
    chunked: bool,
}

impl EventStream {
    /// Opens the stream; fails unless the node answers 200.
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<EventStream, ClientError> {
        use tokio::io::AsyncBufReadExt;
        let io = |source| ClientError::Io {
            method: "GET".into(),
            path: path.to_owned(),
            addr,
            source,
        };
        let bad = |reason| ClientError::BadResponse {
            method: "GET".into(),
            path: path.to_owned(),
            addr,
            reason,
        };
        let open = async {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|source| ClientError::Connect { addr, source })?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.map_err(io)?;
            let mut reader = tokio::io::BufReader::new(stream);
            let mut status_line = String::new();
            reader.read_line(&mut status_line).await.map_err(io)?;
            let status: u16 = status_line
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or(bad("no status code"))?;
            let mut chunked = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.map_err(io)? == 0 {
                    return Err(bad("no end of headers"));
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.trim().eq_ignore_ascii_case("transfer-encoding")
                    && value.trim().eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                }
            }
            if status != 200 {
                return Err(bad("the node refused the event stream"));
            }
            Ok(EventStream {
                reader,
                pending: String::new(),
                chunked,
            })
        };
        tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| ClientError::Timeout {
                method: "GET".into(),
                path: path.to_owned(),
                addr,
                timeout,
            })?
    }

    /// The next event; `None` when the stream ends (the node stopped).
    pub async fn next(&mut self) -> std::io::Result<Option<SseEvent>> {
        loop {
            if let Some(event) = take_event(&mut self.pending) {
                return Ok(Some(event));
            }
            if self.pending.len() > MAX_EVENT {
                return Err(std::io::Error::other("event larger than 1 MiB"));
            }
            let Some(text) = self.read_more().await? else {
                return Ok(None);
            };
            self.pending.push_str(&text.replace("\r\n", "\n"));
        }
    }

    /// The next piece of the body: a chunk, or what a read returns.
    async fn read_more(&mut self) -> std::io::Result<Option<String>> {
        use tokio::io::AsyncBufReadExt;
        let bytes = if self.chunked {
            let mut size = String::new();
            if self.reader.read_line(&mut size).await? == 0 {
                return Ok(None);
            }
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                return Ok(None);
            }
            if size > MAX_EVENT {
                return Err(std::io::Error::other("chunk larger than 1 MiB"));
            }
            let mut chunk = vec![0u8; size + 2];
            self.reader.read_exact(&mut chunk).await?;
            chunk.truncate(size);
            chunk
        } else {
            let mut buf = vec![0u8; 4096];
            let n = self.reader.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.truncate(n);
            buf
        };
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| std::io::Error::other("event stream is not UTF-8"))
    }
}

/// Takes the first complete event (ended by a blank line) out of `pending`;
/// comments (keep-alives) are skipped.
fn take_event(pending: &mut String) -> Option<SseEvent> {
    loop {
        let end = pending.find("\n\n")?;
        let block: String = pending.drain(..end + 2).collect();
        let mut kind = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                kind = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if kind.is_some() || !data.is_empty() {
            return Some(SseEvent {
                kind: kind.unwrap_or_else(|| "message".into()),
                data: data.join("\n"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_parsed_and_comments_skipped() {
        let mut p =
            String::from(": keep-alive\n\nevent: hello\ndata: {\"a\":1}\n\nevent: x\ndata:");
        assert_eq!(
            take_event(&mut p),
            Some(SseEvent {
                kind: "hello".into(),
                data: "{\"a\":1}".into()
            })
        );
        assert_eq!(take_event(&mut p), None, "incomplete");
        p.push_str(" 2\nid: 7\n\n");
        assert_eq!(take_event(&mut p).unwrap().data, "2");
        assert!(p.is_empty());
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc";
        assert_eq!(
            parse_response(plain).unwrap(),
            Response {
                status: 200,
                body: "abc".into()
            }
        );
        let chunked =
            b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().body, "abcde");
        let err = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n{\"error\":\"gone\"}").unwrap();
        assert!(!err.is_success());
        assert_eq!(err.error_message(), "gone");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        let bad_chunk = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n";
        assert!(parse_response(bad_chunk).is_err());
        assert!(parse_response(&[0xff, 0xfe]).is_err());
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        // Bind and drop: the port is free and refuses connections.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = request(addr, "GET", "/status", None, None, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
