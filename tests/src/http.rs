//! A small HTTP/1.1 implementation: header maps, message heads, body framing
//! (Content-Length, chunked, read-until-close) and a one-request-per-connection client.
//!
//! Written for tests: it is strict where a mistake would hide a bug (a body cut short is
//! an error, never a shorter body) and bounded everywhere (head size, timeouts).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest request or response head (start line plus headers) that is accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long a client waits for a connection or for the next bytes of a response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// An ordered header list that keeps duplicates; name lookups ignore ASCII case.
///
/// Names and values are bytes, as on the wire (obs-text 0x80-0xff goes out and comes back
/// unchanged); the `&str` accessors give a lossy UTF-8 view for the many plain-ASCII checks.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<Field>);

/// One header line: the wire bytes, and their lossy text for the `&str` accessors.
#[derive(Clone, PartialEq, Eq)]
struct Field {
    name: Vec<u8>,
    value: Vec<u8>,
    name_text: String,
    value_text: String,
}

impl Field {
    fn new(name: Vec<u8>, value: Vec<u8>) -> Field {
        Field {
            name_text: String::from_utf8_lossy(&name).into_owned(),
            value_text: String::from_utf8_lossy(&value).into_owned(),
            name,
            value,
        }
    }

    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }
}

impl std::fmt::Debug for Headers {
    // Escaped bytes, so a failure message shows exactly what was on the wire.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[")?;
        for (i, h) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}\"{}: {}\"",
                h.name.escape_ascii(),
                h.value.escape_ascii()
            )?;
        }
        f.write_str("]")
    }
}

impl Headers {
    /// An empty header list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a header, keeping any earlier one of the same name.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.push_bytes(name.into(), value.into());
    }

    /// Appends a header given as raw bytes (any byte but CR and LF is sent as is).
    pub fn push_bytes(&mut self, name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.0.push(Field::new(name.into(), value.into()));
    }

    /// The first value of `name`, if any, as lossy UTF-8 text.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.is(name))
            .map(|h| h.value_text.as_str())
    }

    /// The first value of `name`, if any, byte for byte.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|h| h.is(name))
            .map(|h| h.value.as_slice())
    }

    /// Every value of `name`, in the order they were received (lossy text).
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|h| h.is(name))
            .map(|h| h.value_text.as_str())
            .collect()
    }

    /// Every value of `name`, in the order they were received, byte for byte.
    pub fn get_all_bytes(&self, name: &str) -> Vec<&[u8]> {
        self.0
            .iter()
            .filter(|h| h.is(name))
            .map(|h| h.value.as_slice())
            .collect()
    }

    /// Whether at least one header is called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|h| h.is(name))
    }

    /// All headers as `(name, value)` pairs, in order (lossy text).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .map(|h| (h.name_text.as_str(), h.value_text.as_str()))
    }

    /// All headers as `(name, value)` byte pairs, in order.
    pub fn iter_bytes(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0
            .iter()
            .map(|h| (h.name.as_slice(), h.value.as_slice()))
    }

    /// Number of header lines.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (n, v) in iter {
            h.push(n, v);
        }
        h
    }
}

/// A complete HTTP response as a client received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Response headers (multi-valued, case-insensitive lookup).
    pub headers: Headers,
    /// The whole body, de-chunked. Empty for HEAD, 204 and 304.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The body as text (lossy), for assertions and messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How a message body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the peer closes the connection (responses only).
    UntilClose,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn eof(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, msg.into())
}

/// Reads one CRLF- (or LF-) terminated line, without the terminator, as bytes.
/// Returns `None` on a clean end of stream before any byte of the line.
fn read_line(r: &mut impl BufRead, budget: &mut usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *budget {
        return Err(invalid("HTTP head too large"));
    }
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err(eof("connection closed inside an HTTP head"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// `bytes` without leading and trailing spaces and tabs (RFC 9110 §5.5 OWS).
fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// Reads a message head: the start line (as lossy text) and the headers.
/// Returns `None` when the peer closed the connection before sending anything
/// (the normal end of a keep-alive connection).
pub fn read_head(r: &mut impl BufRead) -> io::Result<Option<(String, Headers)>> {
    Ok(read_head_bytes(r)?.map(|(start, h)| (String::from_utf8_lossy(&start).into_owned(), h)))
}

/// Like [`read_head`], with the start line byte for byte.
pub fn read_head_bytes(r: &mut impl BufRead) -> io::Result<Option<(Vec<u8>, Headers)>> {
    let mut budget = MAX_HEAD_BYTES;
    let start = match read_line(r, &mut budget)? {
        None => return Ok(None),
        Some(line) => line,
    };
    let mut headers = Headers::new();
    loop {
        let line = read_line(r, &mut budget)?
            .ok_or_else(|| eof("connection closed inside HTTP headers"))?;
        if line.is_empty() {
            return Ok(Some((start, headers)));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| invalid(format!("malformed header line \"{}\"", line.escape_ascii())))?;
        headers.push_bytes(
            trim_ows(&line[..colon]).to_vec(),
            trim_ows(&line[colon + 1..]).to_vec(),
        );
    }
}

/// The body framing that `headers` declare; `default` applies when neither
/// Transfer-Encoding nor Content-Length is present.
pub fn framing(headers: &Headers, default: Framing) -> io::Result<Framing> {
    if let Some(te) = headers.get("transfer-encoding") {
        if te.to_ascii_lowercase().contains("chunked") {
            return Ok(Framing::Chunked);
        }
        return Err(invalid(format!("unsupported transfer-encoding {te:?}")));
    }
    match headers.get("content-length") {
        Some(cl) => cl
            .parse()
            .map(Framing::Length)
            .map_err(|_| invalid(format!("bad content-length {cl:?}"))),
        None => Ok(default),
    }
}

/// Reads a body with the given framing. A body that ends early is an
/// `UnexpectedEof` error, never a short body.
pub fn read_body(r: &mut impl BufRead, framing: Framing) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => {
            r.by_ref().take(n as u64).read_to_end(&mut body)?;
            if body.len() != n {
                return Err(eof(format!(
                    "body cut short: {} of {n} bytes (Content-Length)",
                    body.len()
                )));
            }
        }
        Framing::UntilClose => {
            r.read_to_end(&mut body)?;
        }
        Framing::Chunked => {
            let mut budget = MAX_HEAD_BYTES;
            loop {
                let line = read_line(r, &mut budget)?.ok_or_else(|| {
                    eof(format!("chunked body cut short after {} bytes", body.len()))
                })?;
                let line = String::from_utf8_lossy(&line);
                let size_hex = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
                if size == 0 {
                    // Trailers (ignored) end with an empty line.
                    loop {
                        let t = read_line(r, &mut budget)?
                            .ok_or_else(|| eof("connection closed inside chunked trailers"))?;
                        if t.is_empty() {
                            return Ok(body);
                        }
                    }
                }
                let before = body.len();
                r.by_ref().take(size as u64).read_to_end(&mut body)?;
                if body.len() - before != size {
                    return Err(eof(format!(
                        "chunk cut short after {} bytes of body",
                        body.len()
                    )));
                }
                let crlf = read_line(r, &mut budget)?.ok_or_else(|| eof("missing chunk CRLF"))?;
                if !crlf.is_empty() {
                    return Err(invalid("chunk data longer than its declared size"));
                }
            }
        }
    }
    Ok(body)
}

/// Whether a response to `method` with `status` carries no body whatever its headers say.
pub fn response_has_no_body(method: &str, status: u16) -> bool {
    method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 || status < 200
}

/// Sends one request on a new connection (`Connection: close`) and reads the whole
/// response. `headers` are sent as given, after a default `Host` when they have none;
/// a `Content-Length` is added when there is a body or the method usually has one.
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut req = RawRequest::new(method, path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req = req.header("Host", "edge.test");
    }
    for (n, v) in headers {
        req = req.header(n, v);
    }
    let needs_length = !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH");
    if needs_length
        && !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        req = req.header("Content-Length", body.len().to_string());
    }
    exchange(addr, &req.body(body).to_bytes(), method)
}

/// A request put together byte by byte, for what a well-behaved client would refuse to
/// send: obs-text in values, odd targets, odd or missing `Host`. Nothing is added but
/// `Connection: close` at the end of the head.
#[derive(Clone, Debug, Default)]
pub struct RawRequest {
    /// The method token.
    pub method: Vec<u8>,
    /// The request target, as sent.
    pub target: Vec<u8>,
    /// Header lines, in order.
    pub headers: Headers,
    /// The body, sent after the head (add a `Content-Length` yourself).
    pub body: Vec<u8>,
}

impl RawRequest {
    /// `METHOD target HTTP/1.1` with no headers at all (not even `Host`).
    pub fn new(method: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> RawRequest {
        RawRequest {
            method: method.as_ref().to_vec(),
            target: target.as_ref().to_vec(),
            ..RawRequest::default()
        }
    }

    /// Appends a header line `name: value`, bytes as given.
    pub fn header(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> RawRequest {
        self.headers
            .push_bytes(name.as_ref().to_vec(), value.as_ref().to_vec());
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl AsRef<[u8]>) -> RawRequest {
        self.body = body.as_ref().to_vec();
        self
    }

    /// The method as lossy text.
    pub fn method_text(&self) -> String {
        String::from_utf8_lossy(&self.method).into_owned()
    }

    /// The bytes on the wire, ending the head with `Connection: close`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.body.len());
        out.extend_from_slice(&self.method);
        out.push(b' ');
        out.extend_from_slice(&self.target);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (n, v) in self.headers.iter_bytes() {
            out.extend_from_slice(n);
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Sends it on a new connection and reads the whole response.
    pub fn send(&self, addr: SocketAddr) -> io::Result<Response> {
        exchange(addr, &self.to_bytes(), &self.method_text())
    }
}

/// Writes `request` verbatim on a new connection and reads one response to it (after any
/// 1xx), framed as a response to `method` (a HEAD response has no body).
pub fn exchange(addr: SocketAddr, request: &[u8], method: &str) -> io::Result<Response> {
    let stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_nodelay(true)?;

    let mut writer = stream.try_clone()?;
    writer.write_all(request)?;
    writer.flush()?;

    let mut reader = BufReader::new(stream);
    loop {
        let (start, headers) =
            read_head(&mut reader)?.ok_or_else(|| eof("connection closed before any response"))?;
        let status = parse_status_line(&start)?;
        if (100..200).contains(&status) {
            continue; // 100 Continue and friends precede the real response.
        }
        let framing = if response_has_no_body(method, status) {
            Framing::Empty
        } else {
            framing(&headers, Framing::UntilClose)?
        };
        let body = read_body(&mut reader, framing)?;
        return Ok(Response {
            status,
            headers,
            body,
        });
    }
}

/// Writes `request` verbatim on a new connection and returns every byte the peer sends
/// until it closes the connection: for checks on the exact wire format (e.g. that a
/// HEAD response carries no body). The request should say `Connection: close`.
pub fn exchange_raw(addr: SocketAddr, request: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(request)?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}

/// A keep-alive HTTP/1.1 client for one server: `GET`s on one connection until the
/// server closes it, then on a new one.
///
/// A server may close an idle keep-alive connection at any time (nginx does when a worker
/// shuts down after a reload); a request sent on a reused connection that the server
/// closed before answering a single byte is sent again once on a new connection, as
/// RFC 9112 §9.3.1 allows for idempotent requests. [`KeepAliveClient::stale_retries`]
/// counts those. Any other failure is an error.
pub struct KeepAliveClient {
    addr: SocketAddr,
    conn: Option<(BufReader<TcpStream>, TcpStream)>,
    /// Requests sent again because the server had closed a reused connection.
    pub stale_retries: usize,
    /// Connections opened.
    pub connections: usize,
}

impl KeepAliveClient {
    /// A client for `addr`; connects on the first request.
    pub fn new(addr: SocketAddr) -> KeepAliveClient {
        KeepAliveClient {
            addr,
            conn: None,
            stale_retries: 0,
            connections: 0,
        }
    }

    /// `GET path` on the current connection (or a new one).
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        let reused = self.conn.is_some();
        match self.try_get(path) {
            Err(Stale) if reused => {
                self.stale_retries += 1;
                self.try_get(path).map_err(|e| e.into_io(path, false))
            }
            r => r.map_err(|e| e.into_io(path, reused)),
        }
    }

    fn try_get(&mut self, path: &str) -> Result<Response, GetError> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, CLIENT_TIMEOUT)?;
            s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
            s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
            s.set_nodelay(true)?;
            self.conn = Some((BufReader::new(s.try_clone()?), s));
            self.connections += 1;
        }
        let (reader, writer) = self.conn.as_mut().expect("connected above");
        let head = format!("GET {path} HTTP/1.1\r\nHost: edge.test\r\n\r\n");
        let sent = writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.flush());
        let stale = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            )
        };
        let head = match sent.and_then(|()| read_head(reader)) {
            Ok(Some(h)) => h,
            // Closed before a single byte of a response.
            Ok(None) => return self.drop_conn(Err(Stale)),
            Err(e) if stale(&e) => return self.drop_conn(Err(Stale)),
            Err(e) => return self.drop_conn(Err(e.into())),
        };
        let (start, headers) = head;
        let status = match parse_status_line(&start) {
            Ok(s) => s,
            Err(e) => return self.drop_conn(Err(e.into())),
        };
        let body = match framing(&headers, Framing::UntilClose).and_then(|f| {
            read_body(
                reader,
                if status == 204 || status == 304 {
                    Framing::Empty
                } else {
                    f
                },
            )
        }) {
            Ok(b) => b,
            Err(e) => return self.drop_conn(Err(e.into())),
        };
        let close = headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let r = Response {
            status,
            headers,
            body,
        };
        if close {
            return self.drop_conn(Ok(r));
        }
        Ok(r)
    }

    fn drop_conn<T>(&mut self, r: Result<T, GetError>) -> Result<T, GetError> {
        self.conn = None;
        r
    }
}

/// Why a keep-alive `GET` failed.
enum GetError {
    /// The server closed the connection before any byte of a response.
    Stale,
    /// Anything else.
    Io(io::Error),
}
use GetError::Stale;

impl From<io::Error> for GetError {
    fn from(e: io::Error) -> Self {
        GetError::Io(e)
    }
}

impl GetError {
    fn into_io(self, path: &str, reused: bool) -> io::Error {
        match self {
            GetError::Io(e) => e,
            Stale => eof(format!(
                "GET {path}: connection closed before any response ({} connection)",
                if reused { "reused" } else { "new" }
            )),
        }
    }
}

/// Parses `HTTP/1.1 200 OK` into 200.
fn parse_status_line(line: &str) -> io::Result<u16> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("not an HTTP/1.x status line: {line:?}")));
    }
    parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {line:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: &[u8]) -> BufReader<&[u8]> {
        BufReader::new(bytes)
    }

    #[test]
    fn headers_are_multi_valued_and_case_insensitive() {
        let h: Headers = [("Vary", "a"), ("vary", "b"), ("X-One", "1")]
            .into_iter()
            .collect();
        assert_eq!(h.get("VARY"), Some("a"));
        assert_eq!(h.get_all("vary"), vec!["a", "b"]);
        assert!(h.contains("x-one"));
        assert!(!h.contains("x-two"));
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn reads_a_head_and_stops_at_the_blank_line() {
        let mut r = reader(b"GET /a HTTP/1.1\r\nHost: x\r\nA:  b \r\n\r\nrest");
        let (start, h) = read_head(&mut r).unwrap().unwrap();
        assert_eq!(start, "GET /a HTTP/1.1");
        assert_eq!(h.get("a"), Some("b"));
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "rest");
    }

    #[test]
    fn obs_text_is_kept_byte_for_byte() {
        let mut r = reader(b"HTTP/1.1 200 OK\r\nX-A: \t\"r\xe9sum\xe9\" \r\nX-\xff: v\r\n\r\n");
        let (start, h) = read_head_bytes(&mut r).unwrap().unwrap();
        assert_eq!(start, b"HTTP/1.1 200 OK");
        assert_eq!(h.get_bytes("x-a"), Some(&b"\"r\xe9sum\xe9\""[..]));
        assert_eq!(h.get("x-a"), Some("\"r\u{fffd}sum\u{fffd}\""));
        assert_eq!(h.iter_bytes().nth(1), Some((&b"X-\xff"[..], &b"v"[..])));
        assert!(format!("{h:?}").contains("r\\xe9sum"));
        let req = RawRequest::new("GET", b"/\x80")
            .header("If-None-Match", b"\"\xfc\"")
            .to_bytes();
        assert_eq!(
            req,
            b"GET /\x80 HTTP/1.1\r\nIf-None-Match: \"\xfc\"\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn clean_eof_is_none_but_eof_inside_a_head_is_an_error() {
        assert!(read_head(&mut reader(b"")).unwrap().is_none());
        assert!(read_head(&mut reader(b"GET / HTTP/1.1\r\nHost: x\r\n")).is_err());
    }

    #[test]
    fn chunked_bodies_are_joined_and_truncation_is_an_error() {
        let ok = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nT: 1\r\n\r\n";
        assert_eq!(
            read_body(&mut reader(ok), Framing::Chunked).unwrap(),
            b"hello!"
        );
        let cut = b"5\r\nhello\r\n";
        let err = read_body(&mut reader(cut), Framing::Chunked).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn content_length_body_cut_short_is_an_error() {
        let err = read_body(&mut reader(b"abc"), Framing::Length(10)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            read_body(&mut reader(b"abcdef"), Framing::Length(3)).unwrap(),
            b"abc"
        );
    }

    #[test]
    fn framing_prefers_chunked_over_length() {
        let h: Headers = [("Content-Length", "3"), ("Transfer-Encoding", "chunked")]
            .into_iter()
            .collect();
        assert_eq!(framing(&h, Framing::Empty).unwrap(), Framing::Chunked);
        let h: Headers = [("content-length", "12")].into_iter().collect();
        assert_eq!(framing(&h, Framing::Empty).unwrap(), Framing::Length(12));
        assert_eq!(
            framing(&Headers::new(), Framing::UntilClose).unwrap(),
            Framing::UntilClose
        );
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(
            parse_status_line("HTTP/1.1 503 Service Unavailable").unwrap(),
            503
        );
        assert!(parse_status_line("SSH-2.0 x").is_err());
    }
}
