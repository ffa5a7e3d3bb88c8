//! A minimal HTTP/1.1 server-side parser and response writer, enough for a REST API on a UNIX
//! socket: request line, headers, and a `Content-Length` body, with size limits.
//!
//! Everything a client sends is untrusted: every malformed or oversized request becomes an
//! [`HttpError`] with the status to answer, never a panic.

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
    /// Content-Length is not a decimal number.
    #[error("Invalid Content-Length {0:?}: expected decimal digits")]
    ContentLengthValue(String),
    /// The request line or a header is not UTF-8.
    #[error("Request line or header is not UTF-8")]
    NotUtf8,
    /// An `Expect` header other than `100-continue`.
    #[error("Unsupported expectation {0:?}; only 100-continue is supported")]
    Expectation(String),
    /// The body is larger than the limit.
    #[error("Request body of {0} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(usize),
    /// Chunked bodies are not supported.
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    TransferEncoding,
}

impl HttpError {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Version(_) => 505,
            HttpError::HeadersTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::TransferEncoding => 501,
            HttpError::Expectation(_) => 417,
            _ => 400,
        }
    }
}

/// The next line of `buf` from `*pos` (up to LF, without CR LF), advancing `*pos`; `None`
/// when no complete line is there yet.
fn next_line<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = &buf[*pos..];
    let n = rest.iter().position(|&b| b == b'\n')?;
    *pos += n + 1;
    let line = &rest[..n];
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

fn text(line: &[u8]) -> Result<&str, HttpError> {
    std::str::from_utf8(line).map_err(|_| HttpError::NotUtf8)
}

/// What the head of a request says about what follows it.
struct Head {
    method: String,
    path: String,
    content_length: usize,
    close: bool,
    expect_continue: bool,
}

fn parse_head(lines: &[&[u8]]) -> Result<Head, HttpError> {
    let (line, headers) = lines.split_first().ok_or(HttpError::RequestLine)?;
    let line = text(line)?;
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
    let mut expect_continue = false;
    for header in headers {
        let header = text(header)?;
        let (name, value) = header.split_once(':').ok_or(HttpError::Header)?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                // Digits only: `+2`, `-0` or ` 2 2` would let two parsers disagree on where
                // the body ends.
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HttpError::ContentLengthValue(value.to_string()));
                }
                let n: usize = value
                    .parse()
                    .map_err(|_| HttpError::BodyTooLarge(usize::MAX))?;
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
            "expect" => {
                if !value.eq_ignore_ascii_case("100-continue") {
                    return Err(HttpError::Expectation(value.to_string()));
                }
                expect_continue = true;
            }
            _ => {}
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge(content_length));
    }
    Ok(Head {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or(target).to_string(),
        content_length,
        close,
        expect_continue,
    })
}

/// How far a buffered request has come.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// The head is complete, the client waits for `100 Continue` before sending the body.
    ExpectsContinue,
    /// A whole request, and how many bytes of the buffer it took.
    Complete(Request, usize),
}

/// Parses the request at the start of `buf`, which holds what a client sent so far. The
/// head may arrive in any number of pieces (Cloud Hypervisor's client sends the request line
/// and the `Content-Length` header in separate writes).
pub fn parse_request(buf: &[u8]) -> Result<Parsed, HttpError> {
    let mut pos = 0;
    // Tolerate empty lines between requests (RFC 9112 2.2).
    let first = loop {
        let start = pos;
        match next_line(buf, &mut pos) {
            None => {
                return if buf.len() > MAX_HEADER_BYTES {
                    Err(HttpError::HeadersTooLarge)
                } else {
                    Ok(Parsed::Incomplete)
                };
            }
            Some([]) => continue,
            Some(_) => break start,
        }
    };
    let mut lines = Vec::new();
    pos = first;
    loop {
        match next_line(buf, &mut pos) {
            Some([]) => break,
            Some(line) => lines.push(line),
            None => {
                return if buf.len() - first > MAX_HEADER_BYTES {
                    Err(HttpError::HeadersTooLarge)
                } else {
                    Ok(Parsed::Incomplete)
                };
            }
        }
        if pos - first > MAX_HEADER_BYTES {
            return Err(HttpError::HeadersTooLarge);
        }
    }
    let head = parse_head(&lines)?;
    let end = pos + head.content_length;
    if buf.len() < end {
        return Ok(if head.expect_continue {
            Parsed::ExpectsContinue
        } else {
            Parsed::Incomplete
        });
    }
    Ok(Parsed::Complete(
        Request {
            method: head.method,
            path: head.path,
            body: buf[pos..end].to_vec(),
            close: head.close,
        },
        end,
    ))
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 \r\n\r\n";

/// Appends a response with an optional JSON body to `out`; `allow` names the allowed method
/// of a 405.
///
/// The status line carries no reason phrase (`HTTP/1.1 200 `), as Cloud Hypervisor's server
/// writes it: its client takes everything after `HTTP/1.1 ` up to the line end, trimmed, as
/// the status code, so a reason phrase would make every answer unreadable to it.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    body: Option<&[u8]>,
    close: bool,
    allow: Option<&str>,
) {
    use std::fmt::Write;
    let mut head = String::with_capacity(160);
    let connection = if close { "close" } else { "keep-alive" };
    // Writing to a String cannot fail.
    let _ = write!(
        head,
        "HTTP/1.1 {status} \r\nServer: baton\r\nConnection: {connection}\r\n"
    );
    if let Some(method) = allow {
        let _ = write!(head, "Allow: {method}\r\n");
    }
    if let Some(b) = body {
        let _ = write!(
            head,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        );
    } else if status != 204 {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Result<Option<Request>, HttpError> {
        match parse_request(s)? {
            Parsed::Complete(r, n) => {
                assert_eq!(n, s.len());
                Ok(Some(r))
            }
            _ => Ok(None),
        }
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
    fn a_request_arriving_in_pieces_is_complete_only_at_its_end() {
        // As Cloud Hypervisor's client writes: request line and first headers, then
        // Content-Length and the blank line, then the body.
        let whole = b"PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
                      Content-Length: 7\r\n\r\n{\"a\":1}";
        for cut in 0..whole.len() {
            assert_eq!(
                parse_request(&whole[..cut]).unwrap(),
                Parsed::Incomplete,
                "{cut}"
            );
        }
        assert!(parse(whole).unwrap().is_some());
    }

    #[test]
    fn two_requests_in_one_buffer() {
        let buf = b"GET /a HTTP/1.1\r\n\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\n";
        let Parsed::Complete(first, n) = parse_request(buf).unwrap() else {
            panic!("first request incomplete");
        };
        assert_eq!(first.path, "/a");
        let Parsed::Complete(second, m) = parse_request(&buf[n..]).unwrap() else {
            panic!("second request incomplete");
        };
        assert_eq!(second.path, "/b");
        assert!(second.close);
        assert_eq!(n + m, buf.len());
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
            (b"PUT / HTTP/1.1\r\nContent-Length: +2\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nContent-Length: -0\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nContent-Length: 1 1\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                413,
            ),
            (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"PUT / HTTP/1.1\r\nExpect: teapot\r\n\r\n", 417),
            (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nX: \xfe\r\n\r\n", 400),
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
        assert_eq!(parse(&huge).unwrap_err().status(), 431);
        huge.extend(b"\r\n\r\n");
        assert_eq!(parse(&huge).unwrap_err().status(), 431);
        let endless = vec![b'G'; MAX_HEADER_BYTES + 1];
        assert_eq!(parse(&endless).unwrap_err().status(), 431);
    }

    #[test]
    fn expect_continue_is_announced_before_the_body() {
        let head = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(parse_request(head).unwrap(), Parsed::ExpectsContinue);
        let mut whole = head.to_vec();
        whole.extend(b"{}");
        assert!(parse(&whole).unwrap().is_some());
    }

    #[test]
    fn empty_or_partial_input_is_incomplete() {
        assert_eq!(parse_request(b"").unwrap(), Parsed::Incomplete);
        assert_eq!(parse_request(b"\r\n").unwrap(), Parsed::Incomplete);
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x").unwrap(),
            Parsed::Incomplete
        );
        assert_eq!(
            parse_request(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc").unwrap(),
            Parsed::Incomplete
        );
    }

    #[test]
    fn response_format_is_cloud_hypervisors() {
        let mut out = Vec::new();
        write_response(&mut out, 200, Some(b"{}"), false, None);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 \r\n"), "{s}");
        // What Cloud Hypervisor's client does with the status line.
        let code: u16 = s.lines().next().unwrap()["HTTP/1.1 ".len()..]
            .trim()
            .parse()
            .unwrap();
        assert_eq!(code, 200);
        assert!(s.contains("Content-Length: 2\r\n"));
        assert!(s.contains("Connection: keep-alive\r\n"));
        assert!(s.ends_with("\r\n\r\n{}"));
        let mut out = Vec::new();
        write_response(&mut out, 204, None, true, None);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 204 \r\n"));
        assert!(!s.contains("Content-Length"));
        assert!(s.contains("Connection: close"));
        let mut out = Vec::new();
        write_response(&mut out, 405, Some(b"[]"), false, Some("GET"));
        assert!(String::from_utf8(out).unwrap().contains("Allow: GET\r\n"));
    }
}
