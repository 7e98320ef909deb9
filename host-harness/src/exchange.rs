//! A whole request through the filter: client request in, scripted upstream reply, what
//! the client got out.

use crate::error::{Error, Trap};
use crate::harness::Headers;
use crate::vm::{Action, LocalReply, Message, StreamId, Vm};

/// A client request.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Request {
    /// Method (default `GET`).
    pub method: String,
    /// Path and query (default `/`).
    pub path: String,
    /// `:authority` (default `example.com`).
    pub authority: String,
    /// `:scheme` (default `http`).
    pub scheme: String,
    /// Other headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
    /// Sizes of the body chunks (the rest goes in one last chunk).
    pub chunks: Vec<usize>,
    /// Trailers (end the request).
    pub trailers: Vec<(String, String)>,
}

impl Request {
    /// `GET path`.
    pub fn get(path: &str) -> Request {
        Request {
            path: path.into(),
            ..Request::default()
        }
    }

    /// Adds a header.
    pub fn header(mut self, k: &str, v: &str) -> Request {
        self.headers.push((k.into(), v.into()));
        self
    }

    /// The pseudo-headers and headers, as the filter sees them.
    pub fn header_list(&self) -> Headers {
        let or = |s: &str, d: &str| {
            if s.is_empty() {
                d.to_string()
            } else {
                s.to_string()
            }
        };
        let mut h = vec![
            (":authority".to_string(), or(&self.authority, "example.com")),
            (":path".to_string(), or(&self.path, "/")),
            (":method".to_string(), or(&self.method, "GET")),
            (":scheme".to_string(), or(&self.scheme, "http")),
        ];
        h.extend(
            self.headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        h
    }
}

/// What the upstream answers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Response {
    /// Status (default 200).
    pub status: u16,
    /// Headers (`content-length` is added for the body unless `chunks` is set or the
    /// headers already have it).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
    /// Sizes of the body chunks as they arrive (the rest goes in one last chunk).
    pub chunks: Vec<usize>,
    /// Trailers.
    pub trailers: Vec<(String, String)>,
}

impl Default for Response {
    fn default() -> Response {
        Response {
            status: 200,
            headers: Vec::new(),
            body: String::new(),
            chunks: Vec::new(),
            trailers: Vec::new(),
        }
    }
}

impl Response {
    /// `200` with `body`.
    pub fn ok(body: &str) -> Response {
        Response {
            body: body.into(),
            ..Response::default()
        }
    }

    /// Adds a header.
    pub fn header(mut self, k: &str, v: &str) -> Response {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// Splits `body` into chunks of `sizes` (the rest in one last chunk).
pub fn chunks<'a>(body: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = body;
    for &n in sizes.iter().filter(|n| **n > 0) {
        if rest.is_empty() {
            break;
        }
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// The outcome of one exchange.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Exchange {
    /// The stream's id.
    pub stream: StreamId,
    /// Every callback's action, in order (`request_headers`, `response_body`, ...).
    pub actions: Vec<(String, Action)>,
    /// What reached the upstream.
    pub upstream_request: Message,
    /// What reached the client.
    pub client: Message,
    /// The local reply, if any.
    pub local_reply: Option<LocalReply>,
    /// Why the stream was reset, if it was.
    pub reset: Option<String>,
    /// Whether the stream was still held at the filter when the exchange ended.
    pub paused: bool,
    /// A trap during the exchange.
    pub trap: Option<Trap>,
}

impl Exchange {
    /// The client's status.
    pub fn status(&self) -> Option<u16> {
        self.client.status()
    }

    /// A client response header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.client.header(name)
    }

    /// The client's body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.client.body).into_owned()
    }
}

fn note(
    actions: &mut Vec<(String, Action)>,
    trap: &mut Option<Trap>,
    what: &str,
    r: Result<Action, Error>,
) -> Result<(), Error> {
    match r {
        Ok(a) => {
            actions.push((what.to_string(), a));
            Ok(())
        }
        Err(Error::Trap(t)) => {
            if trap.is_none() {
                *trap = Some(*t);
            }
            actions.push((what.to_string(), Action::NotCalled));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

impl Vm {
    /// Sends `req` through the filter; if the whole request reaches the upstream,
    /// `upstream` answers it (chunked as the response says); then the stream ends
    /// (`on_log`, `on_done`, `on_delete`) unless `keep_open`. Traps are reported in the
    /// exchange, with the failure policy applied, not as errors.
    pub fn exchange(
        &mut self,
        req: &Request,
        upstream: &mut dyn FnMut(&Message) -> Option<Response>,
        keep_open: bool,
    ) -> Result<Exchange, Error> {
        let mut actions = Vec::new();
        let mut trap = None;
        let mut s = self.http_stream()?;
        let id = s.id();
        let body = req.body.as_bytes();
        let has_trailers = !req.trailers.is_empty();
        let r = s.request_headers(req.header_list(), body.is_empty() && !has_trailers);
        note(&mut actions, &mut trap, "request_headers", r)?;
        let parts = chunks(body, &req.chunks);
        for (i, c) in parts.iter().enumerate() {
            let end = i + 1 == parts.len() && !has_trailers;
            let r = s.request_body(c, end);
            note(&mut actions, &mut trap, "request_body", r)?;
        }
        if has_trailers {
            let r = s.request_trailers(req.trailers.clone());
            note(&mut actions, &mut trap, "request_trailers", r)?;
        }
        let up = s.upstream_request().clone();
        let answered = s.local_reply().is_some() || s.reset().is_some();
        if up.complete && !answered {
            if let Some(resp) = upstream(&up) {
                let body = resp.body.as_bytes();
                let mut h: Headers = vec![(":status".into(), resp.status.to_string())];
                h.extend(
                    resp.headers
                        .iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
                );
                let framed = h
                    .iter()
                    .any(|(k, _)| k == "content-length" || k == "transfer-encoding");
                if !framed && resp.chunks.is_empty() && !body.is_empty() {
                    h.push(("content-length".into(), body.len().to_string()));
                }
                let has_trailers = !resp.trailers.is_empty();
                let r = s.response_headers(h, body.is_empty() && !has_trailers);
                note(&mut actions, &mut trap, "response_headers", r)?;
                let parts = chunks(body, &resp.chunks);
                for (i, c) in parts.iter().enumerate() {
                    let end = i + 1 == parts.len() && !has_trailers;
                    let r = s.response_body(c, end);
                    note(&mut actions, &mut trap, "response_body", r)?;
                }
                if has_trailers {
                    let r = s.response_trailers(resp.trailers.clone());
                    note(&mut actions, &mut trap, "response_trailers", r)?;
                }
            }
        }
        let paused = s.is_paused();
        if !keep_open {
            if let Err(Error::Trap(t)) = s.finish() {
                trap.get_or_insert(*t);
            }
        }
        let failure = self.failure().cloned();
        Ok(Exchange {
            stream: id,
            actions,
            upstream_request: self.upstream_request(id).cloned().unwrap_or_default(),
            client: self.client_response(id).cloned().unwrap_or_default(),
            local_reply: self.local_reply_of(id).cloned(),
            reset: self.reset_of(id).map(str::to_string),
            paused,
            trap: trap.or(failure.filter(|_| false)),
        })
    }
}
