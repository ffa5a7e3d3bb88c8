//! A small client for baton's API socket, used by `baton-remote` and the tests.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("Cannot connect to the API socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// Reading or writing failed.
    #[error("API connection failed")]
    Io(#[source] std::io::Error),
    /// The answer is not HTTP.
    #[error("Malformed answer from the API: {0}")]
    Response(String),
}

/// A status code and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body bytes (JSON or empty).
    pub body: Vec<u8>,
}

impl Response {
    /// The error chain of a failed request, when the body carries one.
    pub fn error_chain(&self) -> Option<Vec<String>> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Sends one request and reads the answer.
pub fn request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&[u8]>,
) -> Result<Response, ClientError> {
    request_with_fds(socket, method, endpoint, body, &[])
}

/// [`request`], passing `fds` with SCM_RIGHTS (TAP queues for `vm.create` and `vm.add-net`).
pub fn request_with_fds(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&[u8]>,
    fds: &[std::os::fd::RawFd],
) -> Result<Response, ClientError> {
    let stream =
        UnixStream::connect(socket).map_err(|e| ClientError::Connect(socket.to_owned(), e))?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {}{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        crate::routes::PREFIX,
        body.len()
    );
    let mut message = head.into_bytes();
    message.extend_from_slice(body);
    let sent = crate::fds::send_with_fds(&stream, &message, fds);
    // A server that refuses a request early (an oversized body) answers and closes before
    // reading it all: its answer is still there to read.
    match read_response(&mut BufReader::new(stream)) {
        Err(_) if sent.is_err() => Err(ClientError::Io(sent.expect_err("checked"))),
        r => r,
    }
}

fn read_response<R: BufRead>(r: &mut R) -> Result<Response, ClientError> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(ClientError::Io)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::Response(line.trim().to_string()))?;
    let mut length: Option<usize> = None;
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(ClientError::Io)? == 0 {
            return Err(ClientError::Response("headers cut short".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(
                    v.trim()
                        .parse()
                        .map_err(|_| ClientError::Response(l.to_string()))?,
                );
            }
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body).map_err(ClientError::Io)?;
        }
        None if status != 204 => {
            r.read_to_end(&mut body).map_err(ClientError::Io)?;
        }
        None => {}
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers() {
        let r = read_response(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"[..]).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = read_response(&mut &b"HTTP/1.1 204 No Content\r\n\r\n"[..]).unwrap();
        assert_eq!(r.status, 204);
        let r = read_response(
            &mut &b"HTTP/1.1 409 Conflict\r\nContent-Length: 9\r\n\r\n[\"a\",\"b\"]"[..],
        )
        .unwrap();
        assert_eq!(r.error_chain(), Some(vec!["a".into(), "b".into()]));
        assert!(read_response(&mut &b"SSH-2.0\r\n"[..]).is_err());
    }
}
