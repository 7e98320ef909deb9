//! Hostile input (issue 12), in both proxies, with raw bytes on the wire: obs-text in every
//! header the filter reads, on requests and responses; attempts to make one request's
//! stored answer serve another (encodings, dot segments, double slashes, absolute-form
//! targets, Host variants); and the 304 the filter's own revalidation gets back, which
//! must never reach a client that did not ask for it.
//!
//! Each scenario gathers every finding before it fails, so one run tells all that is
//! wrong, and notes after which case the proxy logged a trap or panic. Each ends by
//! checking that the cache still stores and serves fresh URLs and that the logs are
//! clean. Run only these, e.g.:
//!
//! ```sh
//! E2E_SCENARIOS=hostile_obs_text_request_headers,hostile_obs_text_response_headers,\
//! hostile_poisoning,hostile_filter_conditional_never_leaks \
//!   cargo test -p edge-filter-e2e --test scenarios_envoy --test scenarios_nginx -- --nocapture
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use crate::http::{RawRequest, Response};
use crate::scenarios::{shipped_plugin_config, Ctx, Proxy};
use crate::upstream::{RecordedRequest, Reply, Upstream};
use crate::CacheStatus;

/// The `Host` the other scenarios' client sends.
pub const HOST: &str = "edge.test";

/// The purge token of [`hostile_config`].
pub const PURGE_TOKEN: &str = "hx-token";

/// Targets containing this are answered by [`echo_reply`], whatever shape the proxy
/// forwards them in.
const POISON: &str = "hx-poison";

/// The shipped plugin JSON with purge enabled (so the token header is read too).
pub fn hostile_config() -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&shipped_plugin_config()).expect("shipped plugin JSON");
    v["purge"] = serde_json::json!({"enabled": true, "token": PURGE_TOKEN});
    v.to_string()
}

/// A number no other request of this test process uses, for fresh URLs.
fn fresh() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// The origin's answers for this module's paths, or `None` for paths it does not own.
pub fn origin_reply(req: &RecordedRequest) -> Option<Reply> {
    let path = req.path.as_str();
    if path.contains(POISON) {
        return Some(echo_reply(req));
    }
    let max_age = |r: Reply| r.header("Cache-Control", "max-age=60");
    if path.starts_with("/hx/ok/") {
        return Some(max_age(Reply::text(format!("ok {path}"))));
    }
    if path.starts_with("/hx/req/vary-") {
        // The variant says which Accept-Language bytes produced it.
        let lang = req
            .headers
            .get_bytes("accept-language")
            .unwrap_or(b"(none)");
        let mut body = b"lang=".to_vec();
        body.extend_from_slice(lang);
        return Some(max_age(Reply::text(body)).header("Vary", "Accept-Language"));
    }
    if path.starts_with("/hx/req/") {
        let etag = "\"h1\"";
        if inm_lists(req, etag) {
            return Some(max_age(Reply::new(304)).header("ETag", etag));
        }
        return Some(
            max_age(Reply::text(format!("req {path}")))
                .header("ETag", etag)
                .header("Last-Modified", "Thu, 01 Jan 2026 00:00:00 GMT"),
        );
    }
    if path.starts_with("/hx/resp/") {
        return Some(raw_response(path));
    }
    if path.starts_with("/hx/leak/") {
        // Stale at once (or always to be revalidated): every use goes to the origin with
        // the filter's own If-None-Match, and gets a 304.
        let cc = if path.starts_with("/hx/leak/nc-") {
            "no-cache"
        } else {
            "max-age=0"
        };
        if inm_lists(req, LEAK_ETAG) {
            return Some(
                Reply::new(304)
                    .header("ETag", LEAK_ETAG)
                    .header("Cache-Control", cc),
            );
        }
        return Some(
            Reply::text(LEAK_BODY)
                .header("ETag", LEAK_ETAG)
                .header("Cache-Control", cc)
                .header("X-Stored", "full"),
        );
    }
    None
}

/// Whether the request's If-None-Match lists `etag` (weak comparison is not needed here).
fn inm_lists(req: &RecordedRequest, etag: &str) -> bool {
    req.headers
        .get_all("if-none-match")
        .iter()
        .any(|v| v.split(',').any(|t| t.trim() == etag))
}

/// `200`, fresh for 60 s, saying which forwarded request produced it: `X-Echo-Target`,
/// `X-Echo-Host`, `X-Echo-Id` (the request's `X-Probe-Id`) and the same in the body.
fn echo_reply(req: &RecordedRequest) -> Reply {
    let id = req.headers.get_bytes("x-probe-id").unwrap_or(b"");
    let mut body = Vec::new();
    for (k, v) in [
        (&b"id="[..], id),
        (b"target=", &req.target),
        (b"host=", req.headers.get_bytes("host").unwrap_or(b"(none)")),
    ] {
        body.extend_from_slice(k);
        body.extend_from_slice(v);
        body.push(b'\n');
    }
    Reply::text(body)
        .header("Cache-Control", "max-age=60")
        .header_bytes("X-Echo-Id", id)
        .echoing(req)
}

// ---------------------------------------------------------------------------------------
// Shared helpers

/// Everything a scenario found wrong, reported together at the end.
struct Findings<'p> {
    proxy: &'p dyn Proxy,
    items: Vec<String>,
    /// How many problem lines the proxy had logged when last looked at.
    logged: usize,
}

impl<'p> Findings<'p> {
    fn new(proxy: &'p dyn Proxy) -> Self {
        Findings {
            proxy,
            items: Vec::new(),
            logged: proxy.problem_lines().len(),
        }
    }

    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.items.push(msg());
        }
    }

    /// Records the problem lines (trap, panic, crash) the proxy logged during `case`; if
    /// there are any, waits until the proxy serves through the filter again, so the next
    /// case is judged on its own (a trap may cost the next requests too, e.g. Envoy's
    /// reload backoff).
    fn logs_after(&mut self, case: &str) {
        let now = self.proxy.problem_lines();
        let Some(first) = now.get(self.logged) else {
            return;
        };
        let first: String = first.chars().take(300).collect();
        self.items.push(format!(
            "{case}: the proxy logged {} new problem line(s), first: {first}",
            now.len() - self.logged
        ));
        self.logged = now.len();
        let recovered = crate::poll(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis(200),
            || {
                let path = format!("/hx/ok/recover-{}", fresh());
                get(&path, &[])
                    .send(self.proxy.listener())
                    .ok()
                    .filter(|r| r.status == 200 && filter_saw(r))
            },
        );
        if recovered.is_none() {
            self.items.push(format!(
                "{case}: the proxy did not serve through the filter again within 10 s"
            ));
        }
    }

    /// Sends `req`; an I/O failure is a finding.
    fn send(&mut self, case: &str, req: &RawRequest) -> Option<Response> {
        match req.send(self.proxy.listener()) {
            Ok(r) => Some(r),
            Err(e) => {
                self.items.push(format!(
                    "{case}: {} {} failed: {e}",
                    req.method_text(),
                    req.target.escape_ascii()
                ));
                None
            }
        }
    }

    fn finish(self, what: &str) {
        assert!(
            self.items.is_empty(),
            "{what}: {} finding(s) in {}:\n- {}",
            self.items.len(),
            self.proxy.name(),
            self.items.join("\n- ")
        );
    }
}

/// A short description of a response for messages.
fn describe(r: &Response) -> String {
    let body = &r.body[..r.body.len().min(120)];
    format!(
        "{} cache-status={:?} body=\"{}\"",
        r.status,
        r.header("cache-status"),
        body.escape_ascii()
    )
}

/// Whether the filter's Cache-Status member is on `r` (a filter that trapped and was
/// skipped, fail-open, adds none).
fn filter_saw(r: &Response) -> bool {
    r.header("cache-status")
        .and_then(|v| CacheStatus::find(v, crate::CACHE))
        .is_some()
}

/// `GET target` with `Host: edge.test` and the extra headers.
fn get(target: &str, headers: &[(&str, &[u8])]) -> RawRequest {
    let mut r = RawRequest::new("GET", target).header("Host", HOST);
    for (n, v) in headers {
        r = r.header(n, v);
    }
    r
}

/// The closing check of every scenario: fresh URLs (several, on new connections, so
/// every worker is likely met) are stored on a miss and served as hits; logs are clean.
fn cache_still_works(f: &mut Findings<'_>, origin: &Upstream, tag: &str) {
    for i in 0..4 {
        let path = format!("/hx/ok/{tag}-{}-{i}", fresh());
        let miss = f.send("after", &get(&path, &[]));
        let hit = f.send("after", &get(&path, &[]));
        let (Some(miss), Some(hit)) = (miss, hit) else {
            continue;
        };
        f.check(
            miss.status == 200 && filter_saw(&miss) && CacheStatus::of(&miss).has("stored"),
            || format!("after: {path} miss not stored: {}", describe(&miss)),
        );
        f.check(
            hit.status == 200
                && filter_saw(&hit)
                && CacheStatus::of(&hit).has("hit")
                && origin.count(&path) == 1,
            || {
                format!(
                    "after: {path} second request not a hit (origin saw {}): {}",
                    origin.count(&path),
                    describe(&hit)
                )
            },
        );
    }
    f.logs_after("the closing miss→hit checks");
}

// ---------------------------------------------------------------------------------------
// 1. obs-text in request headers

/// obs-text (RFC 9110 §5.5) in every request header the filter reads: each request is
/// answered as usual (200, or 304 where the client's own validator matches), forwarded
/// requests carry the bytes unchanged, a `Vary`-selected header that differs in one
/// obs-text byte selects another variant, and a purge with a junk token is refused.
pub fn obs_text_request_headers(ctx: &mut Ctx<'_>) {
    let proxy = ctx.proxy(&hostile_config());
    let mut f = Findings::new(proxy.as_ref());
    let n = fresh();
    let stored = format!("/hx/req/stored-{n}");
    let first = f.send("prime", &get(&stored, &[]));
    f.check(
        first
            .as_ref()
            .is_some_and(|r| r.status == 200 && CacheStatus::of(r).has("stored")),
        || format!("prime {stored}: {:?}", first.as_ref().map(describe)),
    );

    // (header, value, status wanted from the stored entry and from the origin)
    let cases: [(&str, &[u8], u16); 13] = [
        ("If-None-Match", b"\"abcdef\xfc\"", 200),
        ("If-None-Match", b"\"x\xfc\", \"h1\"", 304),
        ("If-None-Match", b"W/\"\xff\"", 200),
        (
            "If-Modified-Since",
            b"\xff\xfe, 01 Jan 2026 00:00:00 GMT",
            200,
        ),
        (
            "User-Agent",
            b"\xff\xff\xff\xff\xff\xff\xff\xff Mozilla/5.0 (\xe9)",
            200,
        ),
        ("Cache-Control", b"max-age=60, x=\"\xff\"", 200),
        ("Cache-Control", b"no-cache, \xe9", 200),
        ("Cache-Control", b"max-stale=\xff", 200),
        ("Pragma", b"no-cache\xff", 200),
        ("Authorization", b"Basic \xff\xfe\xfd", 200),
        ("Accept-Language", b"\xe9", 200),
        ("X-Purge-Token", b"\xff\xfe", 200),
        ("Accept-Encoding", b"gzip\xff", 200),
    ];
    for (i, (name, value, want)) in cases.iter().enumerate() {
        let case = format!("{name}: \"{}\"", value.escape_ascii());
        // On the stored entry (the lookup path).
        if let Some(r) = f.send(&case, &get(&stored, &[(name, value)])) {
            f.check(r.status == *want && filter_saw(&r), || {
                format!(
                    "{case} on a stored entry: want {want}, got {}",
                    describe(&r)
                )
            });
            if r.status == 200 {
                f.check(r.body == format!("req {stored}").as_bytes(), || {
                    format!("{case} on a stored entry: wrong body: {}", describe(&r))
                });
            }
        }
        f.logs_after(&format!("{case} on a stored entry"));
        // On a fresh URL (the forwarding path): the origin gets the bytes unchanged.
        let miss = format!("/hx/req/miss-{n}-{i}");
        if let Some(r) = f.send(&case, &get(&miss, &[(name, value)])) {
            f.check(r.status == *want && filter_saw(&r), || {
                format!("{case} on a miss: want {want}, got {}", describe(&r))
            });
            let seen = ctx.origin.requests();
            let seen = seen.iter().rev().find(|q| q.path == miss);
            f.check(
                r.status != *want
                    || seen.is_some_and(|q| q.headers.get_bytes(name) == Some(*value)),
                || {
                    format!(
                        "{case}: the origin got {:?}",
                        seen.map(|q| q
                            .headers
                            .get_bytes(name)
                            .map(|v| v.escape_ascii().to_string()))
                    )
                },
            );
        }
        f.logs_after(&format!("{case} on a miss"));
    }

    // Two values that differ only in one obs-text byte are two variants.
    let vary = format!("/hx/req/vary-{n}");
    for round in 0..2 {
        for lang in [&b"\xe9"[..], b"\xe8", b"fr-\xff"] {
            let case = format!(
                "Accept-Language: \"{}\" (round {round})",
                lang.escape_ascii()
            );
            if let Some(r) = f.send(&case, &get(&vary, &[("Accept-Language", lang)])) {
                let mut want = b"lang=".to_vec();
                want.extend_from_slice(lang);
                f.check(r.status == 200 && r.body == want, || {
                    format!("{case}: another variant's answer: {}", describe(&r))
                });
                f.check(
                    filter_saw(&r) && (round == 0 || CacheStatus::of(&r).has("hit")),
                    || format!("{case}: the variant was not stored: {}", describe(&r)),
                );
            }
            f.logs_after(&case);
        }
    }
    f.check(ctx.origin.count(&vary) == 3, || {
        format!(
            "{vary}: origin saw {} requests, want 3 (one per variant)",
            ctx.origin.count(&vary)
        )
    });

    // Purge: a junk token is refused and touches nothing; the real one still works.
    for token in [&b"\xff\xfe"[..], b"hx-token\xff", b"\xe9hx-token"] {
        let case = format!("PURGE with token \"{}\"", token.escape_ascii());
        let purge = RawRequest::new("PURGE", &stored)
            .header("Host", HOST)
            .header("X-Purge-Token", token);
        if let Some(r) = f.send(&case, &purge) {
            f.check(r.status == 403, || {
                format!("{case}: want 403, got {}", describe(&r))
            });
        }
        f.logs_after(&case);
    }
    if let Some(r) = f.send("after junk purges", &get(&stored, &[])) {
        f.check(
            r.status == 200 && filter_saw(&r) && CacheStatus::of(&r).has("hit"),
            || format!("the entry did not survive refused purges: {}", describe(&r)),
        );
    }
    let purge = RawRequest::new("PURGE", &stored)
        .header("Host", HOST)
        .header("X-Purge-Token", PURGE_TOKEN);
    if let Some(r) = f.send("PURGE with the token", &purge) {
        f.check(r.status == 200, || {
            format!("PURGE with the token: {}", describe(&r))
        });
    }

    cache_still_works(&mut f, &ctx.origin, "req");
    f.finish("obs-text in request headers");
}

// ---------------------------------------------------------------------------------------
// 2. obs-text in response headers

/// The body of every `/hx/resp/` reply.
const RESP_BODY: &[u8] = b"r\xe9sum\xe9 body";

/// Replies with obs-text and junk in the response headers the filter reads or stores.
fn raw_response(path: &str) -> Reply {
    let r = Reply::text(RESP_BODY)
        .header_bytes(
            "Content-Disposition",
            b"attachment; filename=\"r\xe9sum\xe9.pdf\"",
        )
        .header_bytes("X-Latin1", b"caf\xe9 \x80\xff");
    if path.starts_with("/hx/resp/main-") {
        // Cacheable for 60 s whatever the junk around it (RFC 9111 §4.2, §5.1, §5.3).
        r.header_bytes("ETag", b"\"e\xfc1\"")
            .header_bytes("Cache-Control", b"max-age=60, x=\"\xff\"")
            .header("Vary", "Accept-Encoding")
            .header_bytes("Last-Modified", b"\xff\xfe, 01 Jan 2026 00:00:00 GMT")
            .header_bytes("Expires", b"\xe9t\xe9")
            .header_bytes("Age", b"\xff")
    } else if path.starts_with("/hx/resp/split-") {
        // The directives over two lines, obs-text in the second.
        r.header("Cache-Control", "max-age=60")
            .header_bytes("Cache-Control", b"ext=\"\xfe\xff\"")
            .header_bytes("ETag", b"W/\"\xe9\"")
            .header_bytes("Date", b"\xff\xfe junk")
    } else {
        // Junk in Vary itself: stored or not, it must pass unchanged.
        r.header("Cache-Control", "max-age=60")
            .header_bytes("Vary", b"Accept-Encoding, X-\xff")
    }
}

/// Response headers compared byte for byte: everything but framing, `Date` (nginx sends
/// its own) and `Age` (a cache sets it on hits), and the filter's `Cache-Status`.
fn compared(name: &str) -> bool {
    ![
        "content-length",
        "transfer-encoding",
        "date",
        "age",
        "cache-status",
        "connection",
        "server",
        "x-envoy-upstream-service-time",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// Whether `r` carries every compared header of `want` with the same bytes.
fn same_fields(want: &Reply, r: &Response) -> Result<(), String> {
    for (name, _) in want.headers.iter() {
        if !compared(name) {
            continue;
        }
        let sent = want.headers.get_all_bytes(name);
        let got = r.headers.get_all_bytes(name);
        // RFC 9110 §5.3: a proxy may combine field lines into one, joined by commas (Envoy
        // does so for the headers it keeps inline, such as Cache-Control). Bytes still equal.
        let combined = |v: &[&[u8]]| v.join(&b","[..]);
        let same = sent == got || (got.len() == 1 && combined(&sent) == combined(&got));
        if !same {
            let show = |v: &[&[u8]]| {
                v.iter()
                    .map(|b| format!("\"{}\"", b.escape_ascii()))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "{name}: origin sent [{}], client got [{}]",
                show(&sent),
                show(&got)
            ));
        }
    }
    Ok(())
}

/// obs-text and junk in every response header the filter reads or stores: the miss
/// forwards them byte for byte, the entry is stored (for 60 s despite the junk), and hits
/// serve them byte for byte; a client's If-None-Match naming the obs-text ETag gets 304.
pub fn obs_text_response_headers(ctx: &mut Ctx<'_>) {
    let proxy = ctx.proxy(&hostile_config());
    let mut f = Findings::new(proxy.as_ref());
    let n = fresh();

    for kind in ["main", "split", "vary"] {
        let path = format!("/hx/resp/{kind}-{n}");
        let sent = raw_response(&path);
        let cacheable = kind != "vary";
        for round in 0..3 {
            let case = format!("{path} request {}", round + 1);
            let Some(r) = f.send(&case, &get(&path, &[])) else {
                continue;
            };
            f.check(
                r.status == 200 && r.body == RESP_BODY && filter_saw(&r),
                || format!("{case}: {}", describe(&r)),
            );
            if let Err(e) = same_fields(&sent, &r) {
                f.items.push(format!("{case}: {e}"));
            }
            if cacheable && filter_saw(&r) {
                let cs = CacheStatus::of(&r);
                if round == 0 {
                    f.check(cs.has("stored"), || format!("{case}: not stored: {cs:?}"));
                } else if cs.has("hit") {
                    let ttl = cs.param("ttl").and_then(|t| t.parse::<i64>().ok());
                    f.check(ttl.is_some_and(|t| (55..=60).contains(&t)), || {
                        format!("{case}: ttl {ttl:?}, want about 60 (max-age=60): {cs:?}")
                    });
                } else {
                    f.items.push(format!("{case}: not a hit: {cs:?}"));
                }
            }
            f.logs_after(&case);
        }
        if cacheable {
            f.check(ctx.origin.count(&path) == 1, || {
                format!(
                    "{path}: origin saw {} requests, want 1",
                    ctx.origin.count(&path)
                )
            });
        }
    }

    // Conditionals against the stored obs-text ETag, and HEAD, from the entry.
    let main = format!("/hx/resp/main-{n}");
    let sent = raw_response(&main);
    let inm: [(&[u8], u16); 3] = [
        (b"\"e\xfc1\"", 304),
        (b"\"e\xfd1\"", 200),
        (b"\"x\", \"e\xfc1\"", 304),
    ];
    for (value, want) in inm {
        let case = format!("If-None-Match \"{}\" on {main}", value.escape_ascii());
        if let Some(r) = f.send(&case, &get(&main, &[("If-None-Match", value)])) {
            f.check(r.status == want && filter_saw(&r), || {
                format!("{case}: want {want}, got {}", describe(&r))
            });
            f.check(r.headers.get_bytes("etag") == Some(b"\"e\xfc1\""), || {
                format!(
                    "{case}: ETag {:?}",
                    r.headers
                        .get_bytes("etag")
                        .map(|e| e.escape_ascii().to_string())
                )
            });
        }
        f.logs_after(&case);
    }
    let head = RawRequest::new("HEAD", &main).header("Host", HOST);
    if let Some(r) = f.send("HEAD", &head) {
        f.check(
            r.status == 200 && r.body.is_empty() && filter_saw(&r),
            || format!("HEAD {main}: {}", describe(&r)),
        );
        if let Err(e) = same_fields(&sent, &r) {
            f.items.push(format!("HEAD {main}: {e}"));
        }
    }
    f.check(ctx.origin.count(&main) == 1, || {
        format!(
            "{main}: origin saw {} requests, want 1",
            ctx.origin.count(&main)
        )
    });

    cache_still_works(&mut f, &ctx.origin, "resp");
    f.finish("obs-text in response headers");
}

// ---------------------------------------------------------------------------------------
// 3. Poisoning

/// One crafted request shape: its target and `Host` for a number, and the plain victim
/// target it might be confused with.
struct Crafted {
    name: &'static str,
    target: fn(u64) -> String,
    /// `None`: no Host header at all.
    host: Option<&'static [u8]>,
    victim: fn(u64) -> String,
}

fn v_dash(n: u64) -> String {
    format!("/{POISON}-v-{n}")
}

fn v_slash(n: u64) -> String {
    format!("/{POISON}/v-{n}")
}

const CRAFTED: &[Crafted] = &[
    Crafted {
        name: "percent-encoded unreserved",
        target: |n| format!("/{POISON}-%76-{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_dash,
    },
    Crafted {
        name: "percent-encoded, upper-case hex",
        target: |n| format!("/{POISON}-v%2D{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_dash,
    },
    Crafted {
        name: "percent-encoded, lower-case hex",
        target: |n| format!("/{POISON}-v%2d{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_dash,
    },
    Crafted {
        name: "%2F",
        target: |n| format!("/{POISON}%2Fv-{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_slash,
    },
    Crafted {
        name: "%2f",
        target: |n| format!("/{POISON}%2fv-{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_slash,
    },
    Crafted {
        name: "dot-dot segment",
        target: |n| format!("/x/../{POISON}-v-{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_dash,
    },
    Crafted {
        name: "dot segment",
        target: |n| format!("/./{POISON}-v-{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_dash,
    },
    Crafted {
        name: "encoded dot-dot segment",
        target: |n| format!("/x/%2E%2E/{POISON}-v-{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_dash,
    },
    Crafted {
        name: "leading double slash",
        target: |n| format!("//{POISON}-v-{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_dash,
    },
    Crafted {
        name: "inner double slash",
        target: |n| format!("/{POISON}//v-{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_slash,
    },
    Crafted {
        name: "absolute-form, other host in the target",
        target: |n| format!("http://other.test/{POISON}-v-{n}"),
        host: Some(HOST.as_bytes()),
        victim: v_dash,
    },
    Crafted {
        name: "absolute-form, usual host in the target, Host: other.test",
        target: |n| format!("http://{HOST}/{POISON}-v-{n}"),
        host: Some(b"other.test"),
        victim: v_dash,
    },
    Crafted {
        name: "Host: other.test",
        target: v_dash,
        host: Some(b"other.test"),
        victim: v_dash,
    },
    Crafted {
        name: "Host in upper case",
        target: v_dash,
        host: Some(b"EDGE.TEST"),
        victim: v_dash,
    },
    Crafted {
        name: "Host with :80",
        target: v_dash,
        host: Some(b"edge.test:80"),
        victim: v_dash,
    },
    Crafted {
        name: "Host with a trailing dot",
        target: v_dash,
        host: Some(b"edge.test."),
        victim: v_dash,
    },
    Crafted {
        name: "Host with a junk port",
        target: v_dash,
        host: Some(b"edge.test:junk"),
        victim: v_dash,
    },
    Crafted {
        name: "Host with an empty port",
        target: v_dash,
        host: Some(b"edge.test:"),
        victim: v_dash,
    },
    Crafted {
        name: "Host with userinfo",
        target: v_dash,
        host: Some(b"user@edge.test"),
        victim: v_dash,
    },
    Crafted {
        name: "empty Host",
        target: v_dash,
        host: Some(b""),
        victim: v_dash,
    },
    Crafted {
        name: "Host with obs-text",
        target: v_dash,
        host: Some(b"edge.test\xff"),
        victim: v_dash,
    },
];

/// One request of a poisoning pair, tagged with a probe id the origin echoes back.
struct Probe {
    label: String,
    req: RawRequest,
    id: String,
}

impl Probe {
    fn new(label: String, target: &str, host: Option<&[u8]>) -> Probe {
        let id = format!("p{}", fresh());
        let mut req = RawRequest::new("GET", target);
        if let Some(h) = host {
            req = req.header("Host", h);
        }
        Probe {
            label,
            req: req.header("X-Probe-Id", &id),
            id,
        }
    }

    /// The same request with another id and `Cache-Control: no-cache`, so it reaches the
    /// origin: how the proxy forwards this request.
    fn forced(&self) -> Probe {
        let id = format!("p{}", fresh());
        let mut req = RawRequest::new(self.req.method.clone(), self.req.target.clone());
        for (n, v) in self.req.headers.iter_bytes() {
            if !n.eq_ignore_ascii_case(b"x-probe-id") {
                req = req.header(n, v);
            }
        }
        Probe {
            label: format!("{} (forced to the origin)", self.label),
            req: req
                .header("X-Probe-Id", &id)
                .header("Cache-Control", "no-cache"),
            id,
        }
    }

    fn describe(&self) -> String {
        let host = self
            .req
            .headers
            .get_bytes("host")
            .map_or("(none)".to_string(), |h| {
                format!("\"{}\"", h.escape_ascii())
            });
        format!(
            "{} [GET {} Host: {host}]",
            self.label,
            self.req.target.escape_ascii()
        )
    }
}

/// What the origin saw for one forwarded request: target and Host, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Forwarded {
    target: Vec<u8>,
    host: Option<Vec<u8>>,
}

impl std::fmt::Display for Forwarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "target \"{}\" Host ", self.target.escape_ascii())?;
        match &self.host {
            Some(h) => write!(f, "\"{}\"", h.escape_ascii()),
            None => f.write_str("(none)"),
        }
    }
}

impl Forwarded {
    /// Whether an answer produced for `self` may serve `other`: the same target byte for
    /// byte, and the same Host up to the normalisations that are safe (ASCII case, the
    /// default port).
    fn same_as(&self, other: &Forwarded) -> bool {
        fn host(h: &Option<Vec<u8>>) -> Option<Vec<u8>> {
            h.as_ref().map(|h| {
                let h = h.to_ascii_lowercase();
                h.strip_suffix(b":80").map(<[u8]>::to_vec).unwrap_or(h)
            })
        }
        self.target == other.target && host(&self.host) == host(&other.host)
    }
}

/// How the origin received the request tagged `id`, if it did.
fn forwarded(origin: &Upstream, id: &str) -> Option<Forwarded> {
    origin
        .requests()
        .into_iter()
        .find(|q| q.headers.get_bytes("x-probe-id") == Some(id.as_bytes()))
        .map(|q| Forwarded {
            target: q.target,
            host: q.headers.get_bytes("host").map(<[u8]>::to_vec),
        })
}

/// Sends `p`; returns its response and the probe id the answer echoes (whose stored or
/// fresh answer it is), if the answer is one of the origin's echoes.
fn send_probe(f: &mut Findings<'_>, p: &Probe) -> Option<(Response, Option<String>)> {
    let r = f.send(&p.describe(), &p.req)?;
    let echoed = (r.status == 200)
        .then(|| r.headers.get_bytes("x-echo-id"))
        .flatten()
        .map(|id| String::from_utf8_lossy(id).into_owned());
    if r.status == 200 {
        f.check(filter_saw(&r), || {
            format!(
                "{}: answered without the filter: {}",
                p.describe(),
                describe(&r)
            )
        });
    }
    Some((r, echoed))
}

/// Sends `first` then `second` and checks that `second`'s answer was produced for a
/// request the origin received exactly as it receives `second`.
fn pair(
    f: &mut Findings<'_>,
    origin: &Upstream,
    first: &Probe,
    second: &Probe,
    victim_second: bool,
) {
    let Some((r1, e1)) = send_probe(f, first) else {
        return;
    };
    // Nothing is stored for a fresh number yet: an echo must be the request's own.
    if let Some(e1) = &e1 {
        f.check(*e1 == first.id, || {
            format!("{}: answered with probe {e1}'s response", first.describe())
        });
    } else if !victim_second {
        f.items.push(format!(
            "{}: the victim was not served: {}",
            first.describe(),
            describe(&r1)
        ));
    }
    let Some((r2, e2)) = send_probe(f, second) else {
        return;
    };
    let Some(e2) = e2 else {
        // Only a crafted request may be turned away (by the proxy, say 400).
        f.check(!victim_second, || {
            format!(
                "{} after {}: the victim was not served: {}",
                second.describe(),
                first.describe(),
                describe(&r2)
            )
        });
        return;
    };
    if e2 == second.id {
        return; // produced for this very request
    }
    if e2 != first.id {
        f.items.push(format!(
            "{}: answered with the response of an unrelated probe {e2}",
            second.describe()
        ));
        return;
    }
    // `second` got `first`'s stored answer: fine only if both forward identically.
    let Some(stored_for) = forwarded(origin, &first.id) else {
        f.items.push(format!(
            "{}: got {}'s answer, which the origin never produced",
            second.describe(),
            first.describe()
        ));
        return;
    };
    let forced = second.forced();
    let Some((rf, _)) = send_probe(f, &forced) else {
        return;
    };
    let Some(own) = forwarded(origin, &forced.id) else {
        f.items.push(format!(
            "{}: got {}'s stored answer ({stored_for}); how it forwards is unknown: \
             with no-cache it got {}",
            second.describe(),
            first.describe(),
            describe(&rf)
        ));
        return;
    };
    f.check(stored_for.same_as(&own), || {
        format!(
            "POISONED: {} got the answer stored for {} (origin saw {stored_for}), \
             but it forwards as {own}",
            second.describe(),
            first.describe()
        )
    });
}

/// No crafted request can make the cache answer another request with a response the
/// origin produced for a differently forwarded target or Host, in either order (crafted
/// first, then the victim; victim first, then crafted). What "forwarded" means is read
/// from the origin's log, so each proxy's own normalisation (Envoy's `normalize_path`
/// and `merge_slashes`) is taken into account.
pub fn poisoning(ctx: &mut Ctx<'_>) {
    let proxy = ctx.proxy(&hostile_config());
    let mut f = Findings::new(proxy.as_ref());
    for c in CRAFTED {
        // Crafted first, then the plain victim.
        let n = fresh();
        let crafted = Probe::new(format!("crafted ({})", c.name), &(c.target)(n), c.host);
        let victim = Probe::new("victim".into(), &(c.victim)(n), Some(HOST.as_bytes()));
        pair(&mut f, &ctx.origin, &crafted, &victim, true);
        // Victim first, then crafted.
        let n = fresh();
        let victim = Probe::new("victim".into(), &(c.victim)(n), Some(HOST.as_bytes()));
        let crafted = Probe::new(format!("crafted ({})", c.name), &(c.target)(n), c.host);
        pair(&mut f, &ctx.origin, &victim, &crafted, false);
        f.logs_after(c.name);
    }
    cache_still_works(&mut f, &ctx.origin, "poison");
    f.finish("poisoning");
}

// ---------------------------------------------------------------------------------------
// 4. The filter's own 304 never leaks

const LEAK_ETAG: &str = "\"leak1\"";
const LEAK_BODY: &str = "full leak body";

/// An entry stored with an ETag and `max-age=0` (stale at once) or `no-cache` is
/// revalidated with the filter's own If-None-Match and the origin answers 304; a HEAD, a
/// GET with `Cache-Control: no-store` and a plain GET must each get the full stored
/// response, never that bare 304. A client that sent its own matching validator gets 304.
pub fn filter_conditional_never_leaks(ctx: &mut Ctx<'_>) {
    let proxy = ctx.proxy(&hostile_config());
    let mut f = Findings::new(proxy.as_ref());
    for kind in ["ma0", "nc"] {
        let path = format!("/hx/leak/{kind}-{}", fresh());
        if let Some(r) = f.send("prime", &get(&path, &[])) {
            f.check(
                r.status == 200 && filter_saw(&r) && CacheStatus::of(&r).has("stored"),
                || format!("{path}: not stored: {}", describe(&r)),
            );
        }
        let full = |f: &mut Findings<'_>, case: &str, method: &str, headers: &[(&str, &[u8])]| {
            let mut req = RawRequest::new(method, &path).header("Host", HOST);
            for (n, v) in headers {
                req = req.header(n, v);
            }
            let case = format!("{method} {path} {case}");
            if let Some(r) = f.send(&case, &req) {
                let want_body: &[u8] = if method == "HEAD" {
                    b""
                } else {
                    LEAK_BODY.as_bytes()
                };
                f.check(
                    r.status == 200
                        && r.body == want_body
                        && r.header("x-stored") == Some("full")
                        && r.header("etag") == Some(LEAK_ETAG)
                        && filter_saw(&r),
                    || {
                        format!(
                            "{case}: want the full stored 200, got {} {:?}",
                            describe(&r),
                            r.headers
                        )
                    },
                );
                if let Some(len) = r.header("content-length") {
                    f.check(len == LEAK_BODY.len().to_string(), || {
                        format!("{case}: Content-Length {len}")
                    });
                }
            }
            f.logs_after(&case);
        };
        full(&mut f, "(HEAD)", "HEAD", &[]);
        full(
            &mut f,
            "with Cache-Control: no-store",
            "GET",
            &[("Cache-Control", b"no-store")],
        );
        full(&mut f, "(plain)", "GET", &[]);
        full(
            &mut f,
            "with a non-matching If-None-Match",
            "GET",
            &[("If-None-Match", b"\"other\"")],
        );
        full(&mut f, "(HEAD again)", "HEAD", &[]);

        let own = get(&path, &[("If-None-Match", LEAK_ETAG.as_bytes())]);
        let case = format!("GET {path} with its own If-None-Match {LEAK_ETAG}");
        if let Some(r) = f.send(&case, &own) {
            f.check(r.status == 304 && filter_saw(&r), || {
                format!("{case}: want 304, got {}", describe(&r))
            });
        }
        // The scenario only means something if the filter did revalidate on its own.
        let own_validator = ctx
            .origin
            .requests()
            .iter()
            .filter(|q| q.path == path && q.headers.get("if-none-match") == Some(LEAK_ETAG))
            .count();
        f.check(own_validator >= 2, || {
            format!("{path}: the origin saw {own_validator} revalidations with {LEAK_ETAG}, want at least 2")
        });
    }
    cache_still_works(&mut f, &ctx.origin, "leak");
    f.finish("the filter's 304 never leaks");
}
