//! A minimal HTTP/1.1 server-side parser and response writer, enough for a REST API on a UNIX
//! socket: request line, headers, and a `Content-Length` body, with size limits.
//!
//! Everything a client sends is untrusted: every malformed or oversized request becomes an
//! [`HttpError`] with the status to answer, never a panic.

use std::io::{self, BufRead, Read, Write};

/// Most bytes of request line plus headers.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most bytes of request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (`GET`, `PUT` ...).
    pub method: String,
    /// The path without any query string.
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
    /// Whether the client asked to close the connection after this request.
    pub close: bool,
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The request line is not `METHOD PATH HTTP/1.x`.
    #[error("Malformed HTTP request line")]
    RequestLine,
    /// The HTTP version is not 1.0 or 1.1.
    #[error("Unsupported HTTP version {0}")]
    Version(String),
    /// A header line without a colon, or not UTF-8.
    #[error("Malformed HTTP header")]
    Header,
    /// Request line and headers are too long.
    #[error("Request headers exceed {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    /// Content-Length given twice with different values.
    #[error("Conflicting Content-Length headers")]
    ContentLength,
    /// Content-Length is not a number.
    #[error("Invalid Content-Length")]
    ContentLengthValue(#[source] std::num::ParseIntError),
    /// The request line or a header is not UTF-8.
    #[error("Request line or header is not UTF-8")]
    Utf8(#[source] std::string::FromUtf8Error),
    /// The body is larger than the limit.
    #[error("Request body of {0} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(usize),
    /// Chunked bodies are not supported.
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    TransferEncoding,
    /// The connection ended in the middle of a request.
    #[error("Connection closed in the middle of a request")]
    Truncated,
    /// The connection failed.
    #[error("Connection error")]
    Io(#[source] io::Error),
}

impl HttpError {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Version(_) => 505,
            HttpError::HeadersTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::TransferEncoding => 501,
            _ => 400,
        }
    }
}

/// Reads one line (up to LF) into `line`, counting against `budget`.
fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<Option<String>, HttpError> {
    let mut buf = Vec::new();
    let mut limited = r.take(*budget as u64 + 1);
    let n = limited.read_until(b'\n', &mut buf).map_err(HttpError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(HttpError::HeadersTooLarge);
    }
    *budget -= n;
    if buf.last() != Some(&b'\n') {
        return Err(HttpError::Truncated);
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| HttpError::Header)
}

/// Reads the next request; `Ok(None)` when the client closed the connection between requests.
pub fn read_request<R: BufRead>(r: &mut R) -> Result<Option<Request>, HttpError> {
    let mut budget = MAX_HEADER_BYTES;
    let line = loop {
        match read_line(r, &mut budget)? {
            None => return Ok(None),
            // Tolerate empty lines between requests (RFC 9112 2.2).
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::RequestLine);
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || target.is_empty() {
        return Err(HttpError::RequestLine);
    }
    let mut close = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Err(HttpError::Version(v.to_string())),
        _ => return Err(HttpError::RequestLine),
    };
    let mut content_length: Option<usize> = None;
    loop {
        let header = read_line(r, &mut budget)?.ok_or(HttpError::Truncated)?;
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').ok_or(HttpError::Header)?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let n: usize = value.parse().map_err(HttpError::ContentLengthValue)?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(HttpError::ContentLength);
                }
                content_length = Some(n);
            }
            "transfer-encoding" => return Err(HttpError::TransferEncoding),
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v == "close" {
                    close = true;
                } else if v == "keep-alive" {
                    close = false;
                }
            }
            _ => {}
        }
    }
    let length = content_length.unwrap_or(0);
    if length > MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge(length));
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => HttpError::Truncated,
        _ => HttpError::Io(e),
    })?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(Some(Request {
        method: method.to_string(),
        path,
        body,
        close,
    }))
}

/// The reason phrase for the status codes baton uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Writes a response with an optional JSON body; `allow` names the allowed method of a 405.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    body: Option<&[u8]>,
    close: bool,
    allow: Option<&str>,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\nServer: baton\r\n", reason(status));
    if let Some(method) = allow {
        head.push_str(&format!("Allow: {method}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    } else if status != 204 {
        head.push_str("Content-Length: 0\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if let Some(b) = body {
        w.write_all(b)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn parse(s: &[u8]) -> Result<Option<Request>, HttpError> {
        read_request(&mut BufReader::new(s))
    }

    #[test]
    fn request_with_body() {
        let r =
            parse(b"PUT /api/v1/vm.create?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap()
                .unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/api/v1/vm.create");
        assert_eq!(r.body, b"{}");
        assert!(!r.close);
    }

    #[test]
    fn two_requests_on_one_connection() {
        let mut rd = BufReader::new(
            &b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        );
        assert_eq!(read_request(&mut rd).unwrap().unwrap().path, "/a");
        let second = read_request(&mut rd).unwrap().unwrap();
        assert_eq!(second.path, "/b");
        assert!(second.close);
        assert!(read_request(&mut rd).unwrap().is_none());
    }

    #[test]
    fn rejects_malformed_requests() {
        for (input, status) in [
            (&b"GARBAGE\r\n\r\n"[..], 400),
            (b"get / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"GET / FTP\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
            (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 400),
            (b"GET / HTTP/1.1\r\nHost: x", 400),
        ] {
            let err = parse(input).unwrap_err();
            assert_eq!(
                err.status(),
                status,
                "{:?}: {err}",
                String::from_utf8_lossy(input)
            );
        }
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES));
        huge.extend(b"\r\n\r\n");
        assert_eq!(parse(&huge).unwrap_err().status(), 431);
    }

    #[test]
    fn empty_connection_is_not_an_error() {
        assert!(parse(b"").unwrap().is_none());
    }

    #[test]
    fn response_format() {
        let mut out = Vec::new();
        write_response(&mut out, 200, Some(b"{}"), false, None).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(s.contains("Content-Length: 2\r\n"));
        assert!(s.ends_with("\r\n\r\n{}"));
        let mut out = Vec::new();
        write_response(&mut out, 204, None, true, None).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(!s.contains("Content-Length"));
        assert!(s.contains("Connection: close"));
        let mut out = Vec::new();
        write_response(&mut out, 405, Some(b"[]"), false, Some("GET")).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("Allow: GET\r\n"));
    }
}
