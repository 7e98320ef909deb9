//! HTTP/1.1 for `dispatch_http_call`, without I/O: the request a call sends and an
//! incremental parser for the response it gets. The nginx event-loop client
//! ([`crate::client`]) moves the bytes; everything here is pure, so it is unit-tested
//! natively. Every size the peer or the guest controls is bounded by a constant below.

use proxy_wasm_harness::abi::Pairs;

/// Largest request (head and body) a call may send.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Largest response head (status line and headers), and separately the largest trailer
/// section of a chunked body.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// Most header (or trailer) lines in a response.
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// Largest response body a call accepts; over it the call fails, as Envoy's async client
/// fails one over its buffer limit.
pub const MAX_RESPONSE_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most interim (1xx) responses accepted before the final one.
pub const MAX_INTERIM_RESPONSES: usize = 8;
/// Longest chunk-size line (size and extensions).
pub const MAX_CHUNK_LINE_BYTES: usize = 1024;

/// Why a call's request cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// `:method`, `:path` or `:authority` (or `host`) is missing; Envoy refuses those too.
    #[error("http_call without {0}")]
    Missing(&'static str),
    /// A pseudo-header or header value that cannot go on the wire as it is.
    #[error("http_call: invalid {0}")]
    Invalid(String),
    /// Head and body over [`MAX_REQUEST_BYTES`].
    #[error("http_call request over {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
}

/// A request ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The bytes on the wire.
    pub bytes: Vec<u8>,
    /// A HEAD request: its response has no body whatever its headers say.
    pub head: bool,
}

/// Headers a call never forwards: connection-specific ones (RFC 9110 §7.6.1) and those the
/// client writes itself (`host` from `:authority`, `content-length` from the body).
const DROPPED_REQUEST_HEADERS: &[&[u8]] = &[
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"te",
    b"upgrade",
    b"host",
    b"content-length",
];

/// Connection-specific response headers, removed before the guest sees the response (a
/// proxy must not forward them, RFC 9110 §7.6.1; the body is already de-chunked).
pub(crate) const DROPPED_RESPONSE_HEADERS: &[&[u8]] = &[
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"te",
    b"upgrade",
];

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| is_tchar(*b))
}

/// A field value as RFC 9110 §5.5 allows it: visible characters, obs-text, SP and HTAB.
fn is_field_value(s: &[u8]) -> bool {
    s.iter().all(|b| *b == b'\t' || (*b >= 0x20 && *b != 0x7f))
}

fn value<'a>(headers: &'a Pairs, name: &[u8]) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// A call's request as the guest gave it, checked: the pseudo-headers and the headers
/// that go on to the peer. Both routes of a call (the module's client, an nginx
/// subrequest) start from this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallHead {
    /// `:method`, an HTTP token.
    pub method: Vec<u8>,
    /// `:path`: origin-form (query included), asterisk-form or absolute-form.
    pub path: Vec<u8>,
    /// `:authority`, else the `host` header.
    pub authority: Vec<u8>,
    /// The other headers in order, without connection-specific ones and without `host`
    /// and `content-length` (the sender writes those itself).
    pub headers: Pairs,
}

/// Checks a call's headers (Envoy's pseudo-headers `:method`, `:path`, `:authority`,
/// then the others) and keeps what goes on to the peer; the head (without the body) is
/// bounded by [`MAX_REQUEST_BYTES`].
pub fn call_head(headers: &Pairs) -> Result<CallHead, RequestError> {
    let method = value(headers, b":method").ok_or(RequestError::Missing(":method"))?;
    let path = value(headers, b":path").ok_or(RequestError::Missing(":path"))?;
    let authority = value(headers, b":authority")
        .filter(|a| !a.is_empty())
        .or_else(|| value(headers, b"host"))
        .ok_or(RequestError::Missing(":authority"))?;
    if !is_token(method) {
        return Err(RequestError::Invalid(":method".into()));
    }
    // origin-form or asterisk-form; absolute-form is allowed too (visible, no spaces).
    if path.is_empty() || !path.iter().all(|b| b.is_ascii_graphic()) {
        return Err(RequestError::Invalid(":path".into()));
    }
    if authority.is_empty() || !authority.iter().all(|b| b.is_ascii_graphic()) {
        return Err(RequestError::Invalid(":authority".into()));
    }
    let mut size = method.len() + path.len() + authority.len();
    let mut kept = Vec::new();
    for (k, v) in headers {
        if k.first() == Some(&b':')
            || DROPPED_REQUEST_HEADERS
                .iter()
                .any(|d| k.eq_ignore_ascii_case(d))
        {
            continue;
        }
        if !is_token(k) {
            return Err(RequestError::Invalid(format!(
                "header name {:?}",
                String::from_utf8_lossy(k)
            )));
        }
        if !is_field_value(v) {
            return Err(RequestError::Invalid(format!(
                "value of header {}",
                String::from_utf8_lossy(k)
            )));
        }
        size += k.len() + v.len() + 4;
        if size > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge);
        }
        kept.push((k.clone(), v.clone()));
    }
    Ok(CallHead {
        method: method.to_vec(),
        path: path.to_vec(),
        authority: authority.to_vec(),
        headers: kept,
    })
}

/// Writes an HTTP/1.1 request from a call's headers (see [`call_head`]) and body, with
/// `Connection: close`: one connection per call. Trailers are not sent (they would need a
/// chunked body).
pub fn serialize_request(headers: &Pairs, body: &[u8]) -> Result<Request, RequestError> {
    let head = call_head(headers)?;
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(&head.method);
    out.push(b' ');
    out.extend_from_slice(&head.path);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(&head.authority);
    out.extend_from_slice(b"\r\n");
    for (k, v) in &head.headers {
        out.extend_from_slice(k);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    // A body always has a length; so do the methods whose servers expect one.
    if !body.is_empty() || matches!(head.method.as_slice(), b"POST" | b"PUT" | b"PATCH") {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    if out.len() + body.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge);
    }
    out.extend_from_slice(body);
    Ok(Request {
        bytes: out,
        head: head.method == b"HEAD",
    })
}

/// A complete response, as the guest gets it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// `:status` first, then the headers in order, names lower-cased, connection-specific
    /// ones removed.
    pub headers: Pairs,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// Trailers of a chunked body.
    pub trailers: Pairs,
}

/// A reply Envoy's router makes itself for a call that got no usable response head:
/// `status`, `content-type: text/plain`, the body, its length.
pub fn local_reply(status: u16, body: &str) -> Response {
    Response {
        status,
        headers: vec![
            (b":status".to_vec(), status.to_string().into_bytes()),
            (
                b"content-length".to_vec(),
                body.len().to_string().into_bytes(),
            ),
            (b"content-type".to_vec(), b"text/plain".to_vec()),
        ],
        body: body.as_bytes().to_vec(),
        trailers: Vec::new(),
    }
}

/// Envoy's answer to a call that timed out before its response head: 504.
pub fn gateway_timeout() -> Response {
    local_reply(504, "upstream request timeout")
}

/// Envoy's answer to a call whose connection failed, or was closed or reset, or that
/// got a malformed head, before the response head: 503 with the reset reason
/// (`remote connection failure`, `connection termination`, `protocol error`).
pub fn upstream_reset(reason: &str) -> Response {
    local_reply(
        503,
        &format!(
            "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
        ),
    )
}

/// Why a response was refused. The call then fails as a reset does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The head (or the trailer section) is over [`MAX_RESPONSE_HEAD_BYTES`].
    #[error("response head over {MAX_RESPONSE_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// More than [`MAX_RESPONSE_HEADERS`] header or trailer lines.
    #[error("more than {MAX_RESPONSE_HEADERS} response header lines")]
    TooManyHeaders,
    /// The body is over [`MAX_RESPONSE_BODY_BYTES`].
    #[error("response body over {MAX_RESPONSE_BODY_BYTES} bytes")]
    BodyTooLarge,
    /// Not HTTP/1.x, or framing that cannot be trusted.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// The connection closed before the response was complete.
    #[error("connection closed before the response was complete")]
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data(usize),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length(usize),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// An incremental HTTP/1.x response parser: feed it what the socket gives.
#[derive(Debug)]
pub struct ResponseParser {
    head_request: bool,
    state: State,
    /// Bytes received and not consumed yet (a partial line at most, outside body data).
    buf: Vec<u8>,
    interim: usize,
    /// Lines of a head not complete yet, relative to its start, and where to scan on.
    head_lines: Vec<(usize, usize)>,
    head_scan: usize,
    trailer_bytes: usize,
    response: Response,
}

/// Finds the next line in `buf[pos..]`: its end (without CR LF) and where the next starts.
/// LF alone ends a line too (RFC 9112 §2.2).
fn next_line(buf: &[u8], pos: usize) -> Option<(usize, usize)> {
    let nl = buf[pos..].iter().position(|b| *b == b'\n')? + pos;
    let end = if nl > pos && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    Some((end, nl + 1))
}

/// Parses `name: value` (no whitespace before the colon; no obs-fold).
fn header_line(line: &[u8]) -> Result<(Vec<u8>, Vec<u8>), ResponseError> {
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return Err(ResponseError::Malformed("obsolete header line folding"));
    }
    let colon = line
        .iter()
        .position(|b| *b == b':')
        .ok_or(ResponseError::Malformed("header line without a colon"))?;
    let (name, rest) = (&line[..colon], &line[colon + 1..]);
    if !is_token(name) {
        return Err(ResponseError::Malformed("invalid header name"));
    }
    let value = rest.trim_ascii();
    if !is_field_value(value) {
        return Err(ResponseError::Malformed("invalid header value"));
    }
    Ok((name.to_ascii_lowercase(), value.to_vec()))
}

fn status_line(line: &[u8]) -> Result<u16, ResponseError> {
    let rest = line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))
        .ok_or(ResponseError::Malformed("not an HTTP/1.x status line"))?;
    let code = rest
        .get(..3)
        .ok_or(ResponseError::Malformed("no status code"))?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|b| *b != b' ') {
        return Err(ResponseError::Malformed("invalid status code"));
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if status < 100 {
        return Err(ResponseError::Malformed("invalid status code"));
    }
    Ok(status)
}

/// The body length from Content-Length: every value (repeated headers, comma lists) must
/// be the same number (RFC 9112 §6.3).
fn content_length(headers: &Pairs) -> Result<Option<usize>, ResponseError> {
    let mut found: Option<usize> = None;
    for (_, v) in headers.iter().filter(|(k, _)| k == b"content-length") {
        for part in v.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(ResponseError::Malformed("invalid content-length"));
            }
            let n = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(ResponseError::Malformed("invalid content-length"))?;
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if found.is_some_and(|f| f != n) {
                return Err(ResponseError::Malformed("conflicting content-length"));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Whether the last transfer coding is `chunked` (and whether there is any at all).
fn transfer_chunked(headers: &Pairs) -> Option<bool> {
    let codings: Vec<&[u8]> = headers
        .iter()
        .filter(|(k, _)| k == b"transfer-encoding")
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .collect();
    let last = codings.last()?;
    Some(last.eq_ignore_ascii_case(b"chunked"))
}

impl ResponseParser {
    /// A parser for the response to a request; `head_request` for HEAD (no body).
    pub fn new(head_request: bool) -> ResponseParser {
        ResponseParser {
            head_request,
            state: State::Head,
            buf: Vec::new(),
            interim: 0,
            head_lines: Vec::new(),
            head_scan: 0,
            trailer_bytes: 0,
            response: Response::default(),
        }
    }

    /// Whether the whole response has been parsed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the final response head has been parsed (a failure after it is a reset,
    /// before it Envoy's router answers 503 itself).
    pub fn has_head(&self) -> bool {
        self.state != State::Head
    }

    /// Whether nothing of a response has arrived yet.
    pub fn is_empty(&self) -> bool {
        self.state == State::Head && self.buf.is_empty() && self.interim == 0
    }

    /// Takes `data` from the connection. Returns `Ok(true)` once the response is complete
    /// (bytes after it are ignored: the connection is closed after each call).
    pub fn feed(&mut self, data: &[u8]) -> Result<bool, ResponseError> {
        if self.state == State::Done {
            return Ok(true);
        }
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        let r = self.run(&mut pos);
        self.buf.drain(..pos.min(self.buf.len()));
        r?;
        if self.state == State::Done {
            self.buf.clear();
        }
        Ok(self.state == State::Done)
    }

    /// The connection closed: completes a body read to the close, else refuses a response
    /// cut short.
    pub fn close(&mut self) -> Result<(), ResponseError> {
        match self.state {
            State::Done => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(ResponseError::Truncated),
        }
    }

    /// The response, once complete.
    pub fn into_response(self) -> Option<Response> {
        (self.state == State::Done).then_some(self.response)
    }

    fn append_body(&mut self, from: usize, to: usize) -> Result<(), ResponseError> {
        if self.response.body.len() + (to - from) > MAX_RESPONSE_BODY_BYTES {
            return Err(ResponseError::BodyTooLarge);
        }
        self.response.body.extend_from_slice(&self.buf[from..to]);
        Ok(())
    }

    /// Consumes what it can of `buf[*pos..]`, moving through the states; every step
    /// consumes bytes or returns, so it ends.
    fn run(&mut self, pos: &mut usize) -> Result<(), ResponseError> {
        loop {
            match self.state {
                State::Done => return Ok(()),
                State::Head => {
                    if !self.head(pos)? {
                        return Ok(());
                    }
                }
                State::Length(left) => {
                    let n = left.min(self.buf.len() - *pos);
                    self.append_body(*pos, *pos + n)?;
                    *pos += n;
                    self.state = if left == n {
                        State::Done
                    } else {
                        State::Length(left - n)
                    };
                    if self.state != State::Done {
                        return Ok(());
                    }
                }
                State::UntilClose => {
                    let end = self.buf.len();
                    self.append_body(*pos, end)?;
                    *pos = end;
                    return Ok(());
                }
                State::Chunked(c) => {
                    if !self.chunked(c, pos)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Parses a complete head if `buf[*pos..]` holds one; false when more bytes are needed.
    /// Lines found by earlier calls are kept (relative to the head's start), so a head
    /// that arrives in small pieces is scanned once.
    fn head(&mut self, pos: &mut usize) -> Result<bool, ResponseError> {
        let base = *pos;
        let mut p = base + self.head_scan;
        loop {
            let Some((end, next)) = next_line(&self.buf, p) else {
                if self.buf.len() - base > MAX_RESPONSE_HEAD_BYTES {
                    return Err(ResponseError::HeadTooLarge);
                }
                self.head_scan = p - base;
                return Ok(false);
            };
            if next - base > MAX_RESPONSE_HEAD_BYTES {
                return Err(ResponseError::HeadTooLarge);
            }
            if end == p {
                p = next;
                break;
            }
            // The status line plus at most MAX_RESPONSE_HEADERS header lines.
            if self.head_lines.len() > MAX_RESPONSE_HEADERS {
                return Err(ResponseError::TooManyHeaders);
            }
            self.head_lines.push((p - base, end - base));
            p = next;
        }
        let lines: Vec<(usize, usize)> = std::mem::take(&mut self.head_lines)
            .into_iter()
            .map(|(s, e)| (s + base, e + base))
            .collect();
        self.head_scan = 0;
        let Some(&(s, e)) = lines.first() else {
            return Err(ResponseError::Malformed(
                "empty line instead of a status line",
            ));
        };
        let status = status_line(&self.buf[s..e])?;
        let mut headers: Pairs = Vec::with_capacity(lines.len());
        for &(s, e) in &lines[1..] {
            headers.push(header_line(&self.buf[s..e])?);
        }
        *pos = p;
        if (100..200).contains(&status) {
            if status == 101 {
                return Err(ResponseError::Malformed(
                    "unexpected 101 Switching Protocols",
                ));
            }
            // Interim responses (100 Continue, 103 Early Hints) precede the final one.
            self.interim += 1;
            if self.interim > MAX_INTERIM_RESPONSES {
                return Err(ResponseError::Malformed("too many interim responses"));
            }
            return Ok(true);
        }
        // RFC 9112 §6.3: HEAD, 204 and 304 have no body; then Transfer-Encoding (chunked
        // last, else read to the close); then Content-Length; else read to the close.
        self.state = if self.head_request || status == 204 || status == 304 {
            State::Done
        } else {
            match transfer_chunked(&headers) {
                Some(true) => State::Chunked(Chunk::Size),
                Some(false) => State::UntilClose,
                None => match content_length(&headers)? {
                    Some(n) if n > MAX_RESPONSE_BODY_BYTES => {
                        return Err(ResponseError::BodyTooLarge)
                    }
                    Some(0) => State::Done,
                    Some(n) => State::Length(n),
                    None => State::UntilClose,
                },
            }
        };
        let mut out: Pairs = vec![(b":status".to_vec(), status.to_string().into_bytes())];
        out.extend(
            headers
                .into_iter()
                .filter(|(k, _)| !DROPPED_RESPONSE_HEADERS.contains(&k.as_slice())),
        );
        self.response.status = status;
        self.response.headers = out;
        Ok(true)
    }

    /// One step of a chunked body; false when more bytes are needed.
    fn chunked(&mut self, c: Chunk, pos: &mut usize) -> Result<bool, ResponseError> {
        match c {
            Chunk::Size => {
                let Some((end, next)) = next_line(&self.buf, *pos) else {
                    if self.buf.len() - *pos > MAX_CHUNK_LINE_BYTES {
                        return Err(ResponseError::Malformed("chunk-size line too long"));
                    }
                    return Ok(false);
                };
                if next - *pos > MAX_CHUNK_LINE_BYTES {
                    return Err(ResponseError::Malformed("chunk-size line too long"));
                }
                let line = &self.buf[*pos..end];
                // chunk-size [ chunk-ext ]: the extensions are ignored.
                let digits_end = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                let digits = &line[..digits_end];
                let rest = line[digits_end..].trim_ascii_start();
                if digits.is_empty() || digits.len() > 15 || !(rest.is_empty() || rest[0] == b';') {
                    return Err(ResponseError::Malformed("invalid chunk size"));
                }
                let size = digits.iter().fold(0usize, |n, d| {
                    n * 16 + (*d as char).to_digit(16).unwrap_or(0) as usize
                });
                if self.response.body.len().saturating_add(size) > MAX_RESPONSE_BODY_BYTES {
                    return Err(ResponseError::BodyTooLarge);
                }
                *pos = next;
                self.state = State::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                });
                Ok(true)
            }
            Chunk::Data(left) => {
                let n = left.min(self.buf.len() - *pos);
                if n == 0 {
                    return Ok(false);
                }
                self.append_body(*pos, *pos + n)?;
                *pos += n;
                self.state = State::Chunked(if n == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                });
                Ok(true)
            }
            Chunk::DataEnd => {
                let rest = &self.buf[*pos..];
                let crlf = match rest {
                    [b'\r', b'\n', ..] => 2,
                    [b'\n', ..] => 1,
                    [] | [b'\r'] => return Ok(false),
                    _ => return Err(ResponseError::Malformed("chunk data longer than its size")),
                };
                *pos += crlf;
                self.state = State::Chunked(Chunk::Size);
                Ok(true)
            }
            Chunk::Trailers => {
                let Some((end, next)) = next_line(&self.buf, *pos) else {
                    if self.trailer_bytes + (self.buf.len() - *pos) > MAX_RESPONSE_HEAD_BYTES {
                        return Err(ResponseError::HeadTooLarge);
                    }
                    return Ok(false);
                };
                self.trailer_bytes += next - *pos;
                if self.trailer_bytes > MAX_RESPONSE_HEAD_BYTES {
                    return Err(ResponseError::HeadTooLarge);
                }
                if end == *pos {
                    *pos = next;
                    self.state = State::Done;
                    return Ok(true);
                }
                if self.response.trailers.len() >= MAX_RESPONSE_HEADERS {
                    return Err(ResponseError::TooManyHeaders);
                }
                let t = header_line(&self.buf[*pos..end])?;
                *pos = next;
                self.response.trailers.push(t);
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Header pairs from string literals (also for other modules' tests).
    pub(crate) fn pairs(p: &[(&str, &str)]) -> Pairs {
        p.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn parse_all(head_request: bool, input: &[u8]) -> Result<Response, ResponseError> {
        let mut p = ResponseParser::new(head_request);
        if !p.feed(input)? {
            p.close()?;
        }
        Ok(p.into_response().expect("complete"))
    }

    /// Feeds `input` one byte at a time: the parser must not depend on how reads split.
    fn parse_bytewise(input: &[u8]) -> Result<Response, ResponseError> {
        let mut p = ResponseParser::new(false);
        for b in input {
            if p.feed(std::slice::from_ref(b))? {
                break;
            }
        }
        if !p.is_done() {
            p.close()?;
        }
        Ok(p.into_response().expect("complete"))
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn local_replies_look_like_envoys() {
        let t = gateway_timeout();
        assert_eq!(t.status, 504);
        assert_eq!(t.body, b"upstream request timeout");
        assert_eq!(
            t.headers,
            pairs(&[
                (":status", "504"),
                ("content-length", "24"),
                ("content-type", "text/plain")
            ])
        );
        let r = upstream_reset("remote connection failure");
        assert_eq!(r.status, 503);
        assert_eq!(
            String::from_utf8(r.body.clone()).unwrap(),
            "upstream connect error or disconnect/reset before headers. reset reason: \
             remote connection failure"
        );
        assert_eq!(
            header(&r, "content-length"),
            Some(r.body.len().to_string().as_str())
        );
    }

    #[test]
    fn request_from_pseudo_headers() {
        let h = pairs(&[
            (":method", "GET"),
            (":path", "/check?x=1"),
            (":authority", "upstream"),
            (":scheme", "http"),
            ("user-agent", "edge-filter-readiness"),
            ("connection", "keep-alive"),
            ("content-length", "99"),
            ("host", "ignored"),
        ]);
        let r = serialize_request(&h, b"").unwrap();
        assert_eq!(
            String::from_utf8(r.bytes).unwrap(),
            "GET /check?x=1 HTTP/1.1\r\nHost: upstream\r\nuser-agent: edge-filter-readiness\r\n\
             Connection: close\r\n\r\n"
        );
        assert!(!r.head);
    }

    #[test]
    fn request_with_body_has_its_length() {
        let h = pairs(&[(":method", "POST"), (":path", "/p"), (":authority", "a:81")]);
        let r = serialize_request(&h, b"hello").unwrap();
        assert_eq!(
            String::from_utf8(r.bytes).unwrap(),
            "POST /p HTTP/1.1\r\nHost: a:81\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        let empty_post = serialize_request(&h, b"").unwrap();
        assert!(String::from_utf8(empty_post.bytes)
            .unwrap()
            .contains("Content-Length: 0\r\n"));
        let head = pairs(&[(":method", "HEAD"), (":path", "/"), ("host", "h")]);
        let r = serialize_request(&head, b"").unwrap();
        assert!(r.head);
        assert!(r.bytes.starts_with(b"HEAD / HTTP/1.1\r\nHost: h\r\n"));
    }

    #[test]
    fn request_refuses_missing_and_invalid_fields() {
        let ok = [(":method", "GET"), (":path", "/"), (":authority", "a")];
        for missing in [":method", ":path", ":authority"] {
            let h: Vec<_> = ok.iter().copied().filter(|(k, _)| *k != missing).collect();
            assert_eq!(
                serialize_request(&pairs(&h), b""),
                Err(RequestError::Missing(missing))
            );
        }
        let bad = |k: &str, v: &str| {
            let mut h = pairs(&ok);
            h.retain(|(n, _)| n != k.as_bytes());
            h.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
            serialize_request(&h, b"")
        };
        assert!(matches!(
            bad(":method", "G T"),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            bad(":path", "/a b"),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            bad(":path", "/\r\nX: y"),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            bad(":authority", "a\nb"),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            bad("x-a", "v\r\nInjected: 1"),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            bad("bad name", "v"),
            Err(RequestError::Invalid(_))
        ));
        assert!(bad("x-tab", "a\tb").is_ok());
    }

    #[test]
    fn request_size_is_bounded() {
        let h = pairs(&[(":method", "POST"), (":path", "/"), (":authority", "a")]);
        let body = vec![b'x'; MAX_REQUEST_BYTES];
        assert_eq!(serialize_request(&h, &body), Err(RequestError::TooLarge));
        let mut big = h.clone();
        big.push((b"x-big".to_vec(), vec![b'v'; MAX_REQUEST_BYTES]));
        assert_eq!(serialize_request(&big, b""), Err(RequestError::TooLarge));
    }

    #[test]
    fn content_length_body() {
        let input = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\
                      Connection: close\r\n\r\nhello";
        for r in [
            parse_all(false, input).unwrap(),
            parse_bytewise(input).unwrap(),
        ] {
            assert_eq!(r.status, 200);
            assert_eq!(
                r.headers,
                pairs(&[
                    (":status", "200"),
                    ("content-type", "text/plain"),
                    ("content-length", "5")
                ])
            );
            assert_eq!(r.body, b"hello");
        }
    }

    #[test]
    fn complete_at_content_length_without_waiting_for_close() {
        let mut p = ResponseParser::new(false);
        assert!(!p.feed(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap());
        assert!(!p.has_head());
        assert!(!p.feed(b"ngth: 4\r\n\r\nab").unwrap());
        assert!(p.has_head());
        assert!(p.feed(b"cdEXTRA").unwrap());
        assert_eq!(p.into_response().unwrap().body, b"abcd");
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let input = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Checksum: abc\r\n\r\n";
        for r in [
            parse_all(false, input).unwrap(),
            parse_bytewise(input).unwrap(),
        ] {
            assert_eq!(r.body, b"hello, world");
            assert_eq!(r.headers, pairs(&[(":status", "200")]));
            assert_eq!(r.trailers, pairs(&[("x-checksum", "abc")]));
        }
    }

    #[test]
    fn chunked_wins_over_content_length_and_lf_lines_are_accepted() {
        let input = b"HTTP/1.1 200 OK\nContent-Length: 100\nTransfer-Encoding: gzip, chunked\n\n\
                      3\nabc\n0\n\n";
        let r = parse_all(false, input).unwrap();
        assert_eq!(r.body, b"abc");
    }

    #[test]
    fn body_until_close() {
        let mut p = ResponseParser::new(false);
        assert!(!p.feed(b"HTTP/1.0 200 OK\r\n\r\nsome").unwrap());
        assert!(!p.feed(b" bytes").unwrap());
        p.close().unwrap();
        assert_eq!(p.into_response().unwrap().body, b"some bytes");
        // A transfer coding other than chunked also reads to the close.
        let r = parse_all(
            false,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz",
        )
        .unwrap();
        assert_eq!(r.body, b"zz");
    }

    #[test]
    fn no_body_for_head_204_304() {
        let mut p = ResponseParser::new(true);
        assert!(p
            .feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            .unwrap());
        let r = p.into_response().unwrap();
        assert_eq!(r.body, b"");
        assert_eq!(header(&r, "content-length"), Some("10"));
        for status in ["204 No Content", "304 Not Modified"] {
            let mut p = ResponseParser::new(false);
            let head = format!("HTTP/1.1 {status}\r\nETag: \"x\"\r\n\r\n");
            assert!(p.feed(head.as_bytes()).unwrap());
        }
    }

    #[test]
    fn interim_responses_are_skipped() {
        let input = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
                      HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        let r = parse_all(false, input).unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"ok");
        assert_eq!(header(&r, "link"), None);
        let many = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INTERIM_RESPONSES + 1);
        assert!(matches!(
            ResponseParser::new(false).feed(&many),
            Err(ResponseError::Malformed(_))
        ));
    }

    #[test]
    fn connection_headers_are_removed() {
        let input = b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\n\
                      Transfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n0\r\n\r\n";
        let r = parse_all(false, input).unwrap();
        assert_eq!(
            r.headers,
            pairs(&[(":status", "200"), ("x-a", "1"), ("x-a", "2")])
        );
    }

    #[test]
    fn truncated_responses_are_refused() {
        for input in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\nContent-Le",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        ] {
            let mut p = ResponseParser::new(false);
            assert!(!p.feed(input).unwrap(), "{input:?}");
            assert_eq!(p.close(), Err(ResponseError::Truncated), "{input:?}");
        }
        assert!(ResponseParser::new(false).is_empty());
    }

    #[test]
    fn malformed_responses_are_refused() {
        for input in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 099 X\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"\r\n",
            b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 x\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                matches!(
                    ResponseParser::new(false).feed(input),
                    Err(ResponseError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        // Repeated equal lengths are one length.
        let r = parse_all(
            false,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok",
        )
        .unwrap();
        assert_eq!(r.body, b"ok");
    }

    #[test]
    fn head_limits() {
        let big = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n",
            "v".repeat(MAX_RESPONSE_HEAD_BYTES)
        );
        assert_eq!(
            ResponseParser::new(false).feed(big.as_bytes()),
            Err(ResponseError::HeadTooLarge)
        );
        // Without the end of the head, the bound applies to what is buffered.
        let mut p = ResponseParser::new(false);
        let r = (0..MAX_RESPONSE_HEAD_BYTES / 1000 + 2)
            .map(|_| p.feed(&[b'a'; 1000]))
            .find(Result::is_err);
        assert_eq!(r, Some(Err(ResponseError::HeadTooLarge)));

        let at_limit: String = (0..MAX_RESPONSE_HEADERS)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let ok = format!("HTTP/1.1 204 No Content\r\n{at_limit}\r\n");
        assert_eq!(
            parse_all(false, ok.as_bytes()).unwrap().headers.len(),
            MAX_RESPONSE_HEADERS + 1
        );
        let over = format!("HTTP/1.1 204 No Content\r\n{at_limit}X-Over: v\r\n\r\n");
        assert_eq!(
            ResponseParser::new(false).feed(over.as_bytes()),
            Err(ResponseError::TooManyHeaders)
        );
    }

    #[test]
    fn body_limits() {
        let over = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE_BODY_BYTES + 1
        );
        assert_eq!(
            ResponseParser::new(false).feed(over.as_bytes()),
            Err(ResponseError::BodyTooLarge)
        );
        let chunk = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            MAX_RESPONSE_BODY_BYTES + 1
        );
        assert_eq!(
            ResponseParser::new(false).feed(chunk.as_bytes()),
            Err(ResponseError::BodyTooLarge)
        );
        let mut p = ResponseParser::new(false);
        p.feed(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        let block = vec![b'x'; 64 * 1024];
        let r = (0..MAX_RESPONSE_BODY_BYTES / block.len() + 1)
            .map(|_| p.feed(&block))
            .find(Result::is_err);
        assert_eq!(r, Some(Err(ResponseError::BodyTooLarge)));
        // Exactly at the limit is fine.
        let mut p = ResponseParser::new(false);
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {MAX_RESPONSE_BODY_BYTES}\r\n\r\n");
        p.feed(head.as_bytes()).unwrap();
        assert!(p.feed(&vec![b'y'; MAX_RESPONSE_BODY_BYTES]).unwrap());
        let trailers: String = (0..=MAX_RESPONSE_HEADERS)
            .map(|i| format!("T-{i}: v\r\n"))
            .collect();
        let input =
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n{trailers}\r\n");
        assert_eq!(
            ResponseParser::new(false).feed(input.as_bytes()),
            Err(ResponseError::TooManyHeaders)
        );
        let long_size = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;{}",
            "e".repeat(MAX_CHUNK_LINE_BYTES)
        );
        assert!(matches!(
            ResponseParser::new(false).feed(long_size.as_bytes()),
            Err(ResponseError::Malformed(_))
        ));
    }
}
