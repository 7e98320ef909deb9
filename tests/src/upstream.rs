//! A controllable origin server for the tests: HTTP/1.1 on 127.0.0.1, a thread per
//! connection, keep-alive aware. A closure decides every reply, including how the body
//! goes on the wire (Content-Length, chunked, or deliberately cut off). Every request is
//! recorded so a test can tell whether the cache answered or the origin did.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::http::{self, Framing, Headers};

/// An idle keep-alive connection is closed after this long, so no thread lives forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the accept loop looks at its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// A request as the origin received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Request target as sent (path and query), as lossy text.
    pub path: String,
    /// Request target byte for byte.
    pub target: Vec<u8>,
    /// Request headers.
    pub headers: Headers,
    /// Request body (de-chunked).
    pub body: Vec<u8>,
}

/// How the origin puts a reply body on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BodyMode {
    /// `Content-Length` and the whole body.
    #[default]
    ContentLength,
    /// `Transfer-Encoding: chunked`, split into chunks of these sizes (the remainder, if
    /// any, goes in one last chunk), flushed separately with `pause` between chunks so
    /// the proxy sees them arrive as separate reads.
    Chunked {
        /// Sizes of the leading chunks, in bytes.
        sizes: Vec<usize>,
        /// Pause after each chunk.
        pause: Duration,
    },
    /// Declares `Content-Length` of the whole body but sends only the first `sent`
    /// bytes, then closes the connection.
    TruncatedLength {
        /// Bytes actually sent.
        sent: usize,
    },
    /// Chunked like [`BodyMode::Chunked`] (whole body, 10 ms pauses) but without the
    /// terminating zero-size chunk: the connection is closed instead.
    TruncatedChunked {
        /// Sizes of the leading chunks, in bytes.
        sizes: Vec<usize>,
    },
}

/// What the origin answers to one request.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers to send; framing headers (`Content-Length`, `Transfer-Encoding`) are
    /// added from `mode` and must not be set here.
    pub headers: Headers,
    /// The body (not sent for HEAD, 204 and 304).
    pub body: Vec<u8>,
    /// How the body is framed.
    pub mode: BodyMode,
}

impl Reply {
    /// A reply with `status`, no headers and an empty body.
    pub fn new(status: u16) -> Self {
        Reply {
            status,
            headers: Headers::new(),
            body: Vec::new(),
            mode: BodyMode::ContentLength,
        }
    }

    /// `200` with a `text/plain` body.
    pub fn text(body: impl Into<Vec<u8>>) -> Self {
        Reply::new(200)
            .header("Content-Type", "text/plain")
            .body(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push(name, value);
        self
    }

    /// Adds a header whose value goes on the wire byte for byte (obs-text, junk).
    pub fn header_bytes(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push_bytes(name, value.as_ref());
        self
    }

    /// Adds `X-Echo-Target` (the request target as received) and, when the request had
    /// one, `X-Echo-Host` (its first `Host`), both byte for byte: a cached copy of this
    /// reply tells which forwarded request produced it.
    pub fn echoing(self, req: &RecordedRequest) -> Self {
        let r = self.header_bytes("X-Echo-Target", &req.target);
        match req.headers.get_bytes("host") {
            Some(host) => r.header_bytes("X-Echo-Host", host),
            None => r,
        }
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the body framing.
    pub fn mode(mut self, mode: BodyMode) -> Self {
        self.mode = mode;
        self
    }
}

type Handler = dyn Fn(&RecordedRequest) -> Reply + Send + Sync;

struct Shared {
    handler: Box<Handler>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Open connections, so `stop` can cut them (the proxy would otherwise keep using them).
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler must not hide every later request from the test.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running (or stopped) origin server. Stopped and joined on drop.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Starts an origin on `127.0.0.1:<ephemeral>` whose replies come from `handler`.
    /// The Envoy health check (`GET /` by default) goes through `handler` too.
    pub fn start(handler: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream on 127.0.0.1:0");
        let addr = listener.local_addr().expect("upstream local_addr");
        let mut up = Upstream {
            addr,
            shared: Arc::new(Shared {
                handler: Box::new(handler),
                requests: Mutex::new(Vec::new()),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(0),
            }),
            running: Arc::new(AtomicBool::new(false)),
            acceptor: None,
        };
        up.serve(listener);
        up
    }

    /// Starts an origin that answers the filter's upstream health check (`GET /`, the
    /// default `check_path`) with `200 ok` and every other request with `handler`.
    pub fn origin(handler: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) -> Upstream {
        Upstream::start(move |req| {
            if req.path == "/" {
                Reply::text("ok").header("Cache-Control", "no-store")
            } else {
                handler(req)
            }
        })
    }

    /// The port the origin listens on (kept across `stop`/`restart`).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// How many requests for exactly `path` (path and query) reached the origin.
    pub fn count(&self, path: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    /// Whether the origin is accepting connections.
    pub fn is_running(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Closes the listening socket and every open connection: from now on connections
    /// to the port are refused. Returns once the port is closed.
    pub fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.running.store(false, Ordering::SeqCst);
        acceptor.join().expect("upstream accept thread panicked");
        for (_, conn) in lock(&self.shared.conns).drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same port, keeping the handler and the request record.
    pub fn restart(&mut self) {
        if self.acceptor.is_some() {
            return;
        }
        // std sets SO_REUSEADDR, so only a bounded retry for a racing socket is needed.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("upstream: rebinding {} failed ({e}), retrying", self.addr);
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("upstream: cannot rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("set upstream listener non-blocking");
        self.running.store(true, Ordering::SeqCst);
        let running = Arc::clone(&self.running);
        let shared = Arc::clone(&self.shared);
        self.acceptor = Some(thread::spawn(move || {
            // Polling (not a blocking accept) so `stop` can close the port promptly.
            while running.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = Arc::clone(&shared);
                        thread::spawn(move || serve_connection(&shared, stream));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
                    Err(e) => {
                        eprintln!("upstream: accept failed: {e}");
                        thread::sleep(ACCEPT_POLL);
                    }
                }
            }
        }));
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    if let Ok(clone) = stream.try_clone() {
        lock(&shared.conns).insert(id, clone);
    }
    if let Err(e) = handle_requests(shared, stream) {
        // Resets after `stop` or truncation are expected; anything else helps debugging.
        if !matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::WouldBlock
        ) {
            eprintln!("upstream: connection error: {e}");
        }
    }
    lock(&shared.conns).remove(&id);
}

fn handle_requests(shared: &Shared, stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    loop {
        let Some((start, headers)) = http::read_head_bytes(&mut reader)? else {
            return Ok(()); // the client closed the keep-alive connection
        };
        let mut parts = start.split(|&b| b == b' ');
        let (method, target) = match (parts.next(), parts.next()) {
            (Some(m), Some(t)) => (String::from_utf8_lossy(m).into_owned(), t.to_vec()),
            _ => {
                let start = String::from_utf8_lossy(&start).into_owned();
                return Err(io::Error::new(io::ErrorKind::InvalidData, start));
            }
        };
        let body = http::read_body(&mut reader, http::framing(&headers, Framing::Empty)?)?;
        let close = headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let request = RecordedRequest {
            method,
            path: String::from_utf8_lossy(&target).into_owned(),
            target,
            headers,
            body,
        };
        lock(&shared.requests).push(request.clone());
        let reply = (shared.handler)(&request);
        let keep_open = write_reply(&mut writer, &request.method, &reply)?;
        if close || !keep_open {
            writer.get_ref().shutdown(Shutdown::Both).ok();
            return Ok(());
        }
    }
}

/// Writes `reply`; returns whether the connection may be reused.
fn write_reply(w: &mut BufWriter<TcpStream>, method: &str, reply: &Reply) -> io::Result<bool> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status)).into_bytes();
    for (n, v) in reply.headers.iter_bytes() {
        head.extend_from_slice(n);
        head.extend_from_slice(b": ");
        head.extend_from_slice(v);
        head.extend_from_slice(b"\r\n");
    }
    let no_body = http::response_has_no_body(method, reply.status);
    match &reply.mode {
        BodyMode::ContentLength | BodyMode::TruncatedLength { .. } => {
            head.extend_from_slice(format!("Content-Length: {}\r\n", reply.body.len()).as_bytes());
        }
        BodyMode::Chunked { .. } | BodyMode::TruncatedChunked { .. } => {
            head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
    }
    head.extend_from_slice(b"\r\n");
    w.write_all(&head)?;
    if no_body {
        w.flush()?;
        return Ok(true);
    }
    match &reply.mode {
        BodyMode::ContentLength => {
            w.write_all(&reply.body)?;
            w.flush()?;
            Ok(true)
        }
        BodyMode::TruncatedLength { sent } => {
            w.write_all(&reply.body[..(*sent).min(reply.body.len())])?;
            w.flush()?;
            Ok(false)
        }
        BodyMode::Chunked { sizes, pause } => {
            write_chunks(w, &reply.body, sizes, *pause)?;
            w.write_all(b"0\r\n\r\n")?;
            w.flush()?;
            Ok(true)
        }
        BodyMode::TruncatedChunked { sizes } => {
            write_chunks(w, &reply.body, sizes, Duration::from_millis(10))?;
            // Give the proxy time to forward what it has before the connection drops.
            thread::sleep(Duration::from_millis(50));
            Ok(false)
        }
    }
}

fn write_chunks(
    w: &mut BufWriter<TcpStream>,
    body: &[u8],
    sizes: &[usize],
    pause: Duration,
) -> io::Result<()> {
    let mut rest = body;
    let mut sizes = sizes.iter().copied().filter(|&s| s > 0);
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        write!(w, "{n:x}\r\n")?;
        w.write_all(chunk)?;
        w.write_all(b"\r\n")?;
        w.flush()?;
        rest = tail;
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        304 => "Not Modified",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::send;

    fn origin() -> Upstream {
        Upstream::start(|req| match req.path.as_str() {
            "/chunked" => Reply::text(vec![b'x'; 100]).mode(BodyMode::Chunked {
                sizes: vec![10, 30],
                pause: Duration::ZERO,
            }),
            "/cut" => Reply::text(vec![b'y'; 100]).mode(BodyMode::TruncatedLength { sent: 40 }),
            "/cut-chunked" => {
                Reply::text(vec![b'z'; 100]).mode(BodyMode::TruncatedChunked { sizes: vec![50] })
            }
            _ => Reply::text(format!("{} {}", req.method, req.path)).header("X-A", "1"),
        })
    }

    fn addr(up: &Upstream) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], up.port()))
    }

    #[test]
    fn serves_and_records_requests() {
        let up = origin();
        let r = send(addr(&up), "POST", "/p?q=1", &[("X-T", "v")], b"abc").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "POST /p?q=1");
        assert_eq!(r.header("x-a"), Some("1"));
        let seen = up.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].body, b"abc");
        assert_eq!(seen[0].headers.get("x-t"), Some("v"));
        assert_eq!(up.count("/p?q=1"), 1);
        assert_eq!(up.count("/p"), 0);
    }

    #[test]
    fn raw_bytes_round_trip_and_echo() {
        let up = Upstream::start(|req| {
            Reply::text("e")
                .header_bytes(
                    "Content-Disposition",
                    b"attachment; filename=\"r\xe9sum\xe9.pdf\"",
                )
                .echoing(req)
        });
        let r = http::RawRequest::new("GET", "/a%2Fb")
            .header("Host", b"h\xff:80")
            .header("User-Agent", b"\xff\xfe")
            .send(addr(&up))
            .unwrap();
        assert_eq!(
            r.headers.get_bytes("content-disposition"),
            Some(&b"attachment; filename=\"r\xe9sum\xe9.pdf\""[..])
        );
        assert_eq!(r.headers.get_bytes("x-echo-target"), Some(&b"/a%2Fb"[..]));
        assert_eq!(r.headers.get_bytes("x-echo-host"), Some(&b"h\xff:80"[..]));
        let seen = &up.requests()[0];
        assert_eq!(seen.target, b"/a%2Fb");
        assert_eq!(seen.headers.get_bytes("user-agent"), Some(&b"\xff\xfe"[..]));
    }

    #[test]
    fn chunked_and_truncated_bodies() {
        let up = origin();
        let r = send(addr(&up), "GET", "/chunked", &[], b"").unwrap();
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.body, vec![b'x'; 100]);
        let e = send(addr(&up), "GET", "/cut", &[], b"").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = send(addr(&up), "GET", "/cut-chunked", &[], b"").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // HEAD gets the headers only, on a reusable connection.
        let r = send(addr(&up), "HEAD", "/x", &[], b"").unwrap();
        assert!(r.body.is_empty());
        assert_eq!(r.header("content-length"), Some("7")); // "HEAD /x"
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        let up = origin();
        let stream = TcpStream::connect(addr(&up)).unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        for i in 0..3 {
            write!(w, "GET /k{i} HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
            let (start, h) = http::read_head(&mut r).unwrap().unwrap();
            assert!(start.starts_with("HTTP/1.1 200"));
            let body = http::read_body(&mut r, http::framing(&h, Framing::Empty).unwrap()).unwrap();
            assert_eq!(body, format!("GET /k{i}").as_bytes());
        }
        assert_eq!(up.requests().len(), 3);
    }

    #[test]
    fn keep_alive_client_reuses_and_retries_a_closed_connection_once() {
        let mut up = origin();
        let mut c = http::KeepAliveClient::new(addr(&up));
        for i in 0..3 {
            let r = c.get(&format!("/ka{i}")).unwrap();
            assert_eq!(r.text(), format!("GET /ka{i}"));
        }
        assert_eq!((c.connections, c.stale_retries), (1, 0));
        // The server cuts the idle connection: the next GET goes again on a new one.
        up.stop();
        up.restart();
        assert_eq!(c.get("/after").unwrap().text(), "GET /after");
        assert_eq!((c.connections, c.stale_retries), (2, 1));
        // A truncated body is an error, not a retry.
        assert!(c.get("/cut").is_err());
        assert_eq!(c.stale_retries, 1);
        // Nothing listening: an error on a new connection, no retry.
        up.stop();
        assert!(c.get("/x").is_err());
        assert_eq!(c.stale_retries, 1);
    }

    #[test]
    fn stop_refuses_connections_and_restart_reuses_the_port() {
        let mut up = origin();
        let port = up.port();
        // An idle keep-alive connection must be cut by stop too.
        let idle = TcpStream::connect(addr(&up)).unwrap();
        thread::sleep(Duration::from_millis(50));
        up.stop();
        assert!(!up.is_running());
        let e = send(addr(&up), "GET", "/", &[], b"").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        idle.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(io::Read::read(&mut &idle, &mut buf).unwrap_or(0), 0);
        up.restart();
        assert_eq!(up.port(), port);
        assert_eq!(
            send(addr(&up), "GET", "/again", &[], b"").unwrap().status,
            200
        );
        assert_eq!(up.count("/again"), 1);
    }
}
