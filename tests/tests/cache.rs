//! RFC 9111 cache behaviour of the filter, end to end: real Envoy, the release .wasm,
//! and an origin that counts what reaches it. Each test has its own Envoy and origin.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use edge_filter_e2e::{poll, BodyMode, CacheStatus, Envoy, Reply, Response, Upstream, CACHE};
use serde_json::Value;

/// `ttl` of a hit, checking the exact `edge-filter; hit; ttl=<n>` shape.
fn hit_ttl(r: &Response) -> u64 {
    let cs = CacheStatus::of(r);
    let ttl: u64 = cs
        .param("ttl")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("hit without a numeric ttl: {cs:?}"));
    assert_eq!(
        r.header("cache-status"),
        Some(format!("{CACHE}; hit; ttl={ttl}").as_str()),
        "hit Cache-Status shape"
    );
    ttl
}

fn age(r: &Response) -> u64 {
    r.header("age")
        .unwrap_or_else(|| panic!("no Age header in {:?}", r.headers))
        .parse()
        .expect("numeric Age")
}

fn assert_not_hit(r: &Response) {
    let cs = CacheStatus::of(r);
    assert!(!cs.has("hit"), "unexpected hit: {cs:?}");
    assert!(
        cs.param("fwd").is_some(),
        "a forwarded response says fwd=: {cs:?}"
    );
}

/// A body whose bytes depend on their position, so reordering or loss shows.
fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn miss_then_hit_serves_the_stored_response() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/page" => Reply::text("hello from origin")
            .header("Cache-Control", "max-age=60")
            .header("X-Origin", "one")
            .header("ETag", "\"v1\""),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");

    let miss = envoy.get("/page");
    assert_eq!(miss.status, 200);
    assert_eq!(miss.text(), "hello from origin");
    assert_eq!(
        miss.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );

    let hit = envoy.get("/page");
    assert_eq!(hit.status, 200);
    assert_eq!(hit.body, miss.body);
    let ttl = hit_ttl(&hit);
    assert!((55..=60).contains(&ttl), "ttl {ttl} for max-age=60");
    for name in ["x-origin", "etag", "content-type", "cache-control"] {
        assert_eq!(hit.header(name), miss.header(name), "stored header {name}");
    }
    assert!(age(&hit) <= 2);
    assert_eq!(up.count("/page"), 1, "the hit must not reach the origin");

    // A third request (possibly on the other worker thread) is a hit as well.
    let again = envoy.get("/page");
    assert_eq!(again.body, miss.body);
    hit_ttl(&again);
    assert_eq!(up.count("/page"), 1);

    // The shipped JSON access log records each request with its Cache-Status
    // (Envoy flushes it about once a second).
    let statuses = poll(Duration::from_secs(5), Duration::from_millis(200), || {
        let lines: Vec<Value> = envoy
            .access_log()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: access log line {l:?}"))
            })
            .filter(|j: &Value| j.get("path").and_then(Value::as_str) == Some("/page"))
            .collect();
        (lines.len() == 3).then_some(lines)
    })
    .expect("three /page lines in the access log");
    let cache_statuses: Vec<&str> = statuses
        .iter()
        .map(|j| j.get("cache_status").and_then(Value::as_str).unwrap_or(""))
        .collect();
    assert_eq!(
        cache_statuses[0],
        "edge-filter; fwd=uri-miss; fwd-status=200; stored"
    );
    assert!(cache_statuses[1..]
        .iter()
        .all(|s| s.starts_with("edge-filter; hit")));
}

#[test]
fn head_is_answered_from_a_get_entry() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/doc" => Reply::text("a document body").header("Cache-Control", "max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    let get = envoy.get("/doc");
    assert_eq!(get.status, 200);

    let head = envoy.request("HEAD", "/doc", &[], b"");
    assert_eq!(head.status, 200);
    hit_ttl(&head);
    if let Some(len) = head.header("content-length") {
        assert_eq!(len, get.body.len().to_string(), "HEAD Content-Length");
    }
    // On the wire: nothing may follow the head of a HEAD response.
    let raw = envoy.raw(b"HEAD /doc HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n");
    let text = String::from_utf8_lossy(&raw);
    let end = text.find("\r\n\r\n").expect("complete response head") + 4;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(&text[end..], "", "HEAD response carried a body");

    assert_eq!(up.count("/doc"), 1);
    assert!(
        up.requests().iter().all(|r| r.method != "HEAD"),
        "HEAD reached the origin"
    );
}

#[test]
fn age_grows_while_an_entry_is_served() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/fresh" => Reply::text("fresh").header("Cache-Control", "max-age=60"),
        "/aged" => Reply::text("aged")
            .header("Cache-Control", "max-age=60")
            .header("Age", "10"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");

    envoy.get("/fresh");
    let first = envoy.get("/fresh");
    let (age1, ttl1) = (age(&first), hit_ttl(&first));
    thread::sleep(Duration::from_millis(2100));
    let second = envoy.get("/fresh");
    let (age2, ttl2) = (age(&second), hit_ttl(&second));
    assert!(age2 > age1, "Age did not grow: {age1} then {age2}");
    assert!(age2 <= age1 + 4, "Age jumped: {age1} then {age2}");
    assert!(ttl2 < ttl1, "ttl did not shrink: {ttl1} then {ttl2}");
    assert_eq!(up.count("/fresh"), 1);

    // The origin's own Age counts (RFC 9111 §4.2.3): the entry was already 10 s old.
    let miss = envoy.get("/aged");
    assert_eq!(miss.text(), "aged");
    let hit = envoy.get("/aged");
    let age = age(&hit);
    assert!((10..=13).contains(&age), "Age {age} with upstream Age: 10");
    let ttl = hit_ttl(&hit);
    assert!(ttl <= 50, "ttl {ttl} ignores the upstream Age");
    assert_eq!(up.count("/aged"), 1);
}

#[test]
fn no_store_is_not_stored() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/ns" => Reply::text("secret").header("Cache-Control", "no-store, max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    for n in 1..=2 {
        let r = envoy.get("/ns");
        assert_eq!(r.text(), "secret");
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=uri-miss; fwd-status=200; detail=no-store")
        );
        assert_eq!(up.count("/ns"), n);
    }
}

#[test]
fn private_is_not_stored() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/pv" => Reply::text("mine").header("Cache-Control", "private, max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    for n in 1..=2 {
        let r = envoy.get("/pv");
        assert_eq!(r.text(), "mine");
        assert_eq!(CacheStatus::of(&r).param("detail"), Some("private"));
        assert_not_hit(&r);
        assert_eq!(up.count("/pv"), n);
    }
}

#[test]
fn vary_variants_are_stored_separately() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/v" => {
            let enc = req.headers.get("accept-encoding").unwrap_or("none");
            Reply::text(format!("variant for {enc}"))
                .header("Cache-Control", "max-age=60")
                .header("Vary", "Accept-Encoding")
        }
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    let gzip = [("Accept-Encoding", "gzip")];
    let br = [("Accept-Encoding", "br")];

    let a = envoy.get_with("/v", &gzip);
    assert_eq!(a.text(), "variant for gzip");
    assert_eq!(
        a.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );
    let b = envoy.get_with("/v", &br);
    assert_eq!(b.text(), "variant for br");
    assert_eq!(
        b.header("cache-status"),
        Some("edge-filter; fwd=vary-miss; fwd-status=200; stored")
    );
    assert_eq!(up.count("/v"), 2);

    for _ in 0..2 {
        let a = envoy.get_with("/v", &gzip);
        assert_eq!(a.text(), "variant for gzip");
        hit_ttl(&a);
        let b = envoy.get_with("/v", &br);
        assert_eq!(b.text(), "variant for br");
        hit_ttl(&b);
    }
    assert_eq!(up.count("/v"), 2, "each variant reaches the origin once");
    let seen: Vec<_> = up
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v")
        .map(|r| r.headers.get("accept-encoding").map(str::to_string))
        .collect();
    assert_eq!(seen, [Some("gzip".to_string()), Some("br".to_string())]);
}

#[test]
fn vary_star_is_never_served_from_cache() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/vs" => Reply::text("anything")
            .header("Cache-Control", "max-age=60")
            .header("Vary", "*"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    for n in 1..=3 {
        let r = envoy.get("/vs");
        assert_eq!(r.text(), "anything");
        assert_not_hit(&r);
        assert_eq!(CacheStatus::of(&r).param("detail"), Some("vary-star"));
        assert_eq!(up.count("/vs"), n);
    }
}

/// Small `max_entry_bytes` so that 64 KiB is far over the limit.
const SMALL_ENTRIES: &str = r#"{"cache": {"max_entry_bytes": 1024}}"#;

#[test]
fn chunked_body_over_the_entry_limit_passes_intact_and_is_not_stored() {
    const BIG: usize = 64 * 1024;
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/big" => Reply::new(200)
            .header("Content-Type", "application/octet-stream")
            .header("Cache-Control", "max-age=60")
            .body(patterned(BIG))
            .mode(BodyMode::Chunked {
                sizes: vec![1000, 3000, 8192, 16384],
                pause: Duration::from_millis(5),
            }),
        "/small" => Reply::text("x".repeat(100)).header("Cache-Control", "max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), SMALL_ENTRIES);

    for n in 1..=2 {
        let r = envoy.get("/big");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), BIG);
        assert!(r.body == patterned(BIG), "body corrupted on request {n}");
        assert_not_hit(&r);
        assert_eq!(up.count("/big"), n, "an over-limit body must not be stored");
    }

    // The same config still caches what fits.
    envoy.get("/small");
    hit_ttl(&envoy.get("/small"));
    assert_eq!(up.count("/small"), 1);
}

#[test]
fn content_length_over_the_entry_limit_is_not_stored() {
    const BIG: usize = 64 * 1024;
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/big" => Reply::new(200)
            .header("Cache-Control", "max-age=60")
            .body(patterned(BIG)),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), SMALL_ENTRIES);
    for n in 1..=2 {
        let r = envoy.get("/big");
        assert!(r.body == patterned(BIG), "body corrupted on request {n}");
        assert_eq!(r.header("content-length"), Some("65536"));
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=uri-miss; fwd-status=200; detail=too-large")
        );
        assert_eq!(up.count("/big"), n);
    }
}

#[test]
fn truncated_upstream_bodies_are_not_stored() {
    // The first answer per path is cut off; later ones are complete.
    let cut_served = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let served = Arc::clone(&cut_served);
    let up = Upstream::origin(move |req| {
        let full = Reply::new(200)
            .header("Cache-Control", "max-age=60")
            .body(patterned(20_000));
        match req.path.as_str() {
            "/cut-length" if served[0].fetch_add(1, Ordering::SeqCst) == 0 => {
                full.mode(BodyMode::TruncatedLength { sent: 7_000 })
            }
            "/cut-chunked" if served[1].fetch_add(1, Ordering::SeqCst) == 0 => {
                full.mode(BodyMode::TruncatedChunked {
                    sizes: vec![4_000, 4_000, 4_000],
                })
            }
            "/cut-length" => full,
            "/cut-chunked" => full.mode(BodyMode::Chunked {
                sizes: vec![4_000],
                pause: Duration::ZERO,
            }),
            _ => Reply::new(404),
        }
    });
    let envoy = Envoy::start(up.port(), "{}");

    for path in ["/cut-length", "/cut-chunked"] {
        let first = envoy.try_request("GET", path, &[], b"");
        assert!(
            first.is_err(),
            "{path}: the client must see the truncation, got a complete {:?}",
            first.map(|r| (r.status, r.body.len()))
        );
        let second = envoy.get(path);
        assert_eq!(second.status, 200);
        assert!(second.body == patterned(20_000), "{path}: body corrupted");
        assert_not_hit(&second);
        assert_eq!(up.count(path), 2, "{path}: the cut-off response was stored");
        // The complete response was stored, so the entry works.
        let third = envoy.get(path);
        assert!(third.body == patterned(20_000));
        hit_ttl(&third);
        assert_eq!(up.count(path), 2);
    }
}

#[test]
fn post_is_forwarded_and_not_stored() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/form" => Reply::text(format!(
            "{} {}",
            req.method,
            String::from_utf8_lossy(&req.body)
        ))
        .header("Cache-Control", "max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    for n in 1..=2 {
        let r = envoy.request("POST", "/form", &[("Content-Type", "text/plain")], b"data");
        assert_eq!(r.text(), "POST data");
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=method; fwd-status=200")
        );
        assert_eq!(up.count("/form"), n);
    }
    let get = envoy.get("/form");
    assert_eq!(get.text(), "GET ");
    assert_not_hit(&get);
    assert_eq!(up.count("/form"), 3);
}

#[test]
fn cache_status_is_appended_to_the_upstream_value() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/layered" => Reply::text("layered")
            .header("Cache-Control", "max-age=60")
            .header("Cache-Status", "origin-cache; hit"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    let r = envoy.get("/layered");
    let value = r.headers.get_all("cache-status").join(", ");
    assert_eq!(
        value, "origin-cache; hit, edge-filter; fwd=uri-miss; fwd-status=200; stored",
        "RFC 9211: each cache appends its member after the upstream's"
    );
}

#[test]
fn request_no_cache_goes_to_the_origin() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/page" => Reply::text("page").header("Cache-Control", "max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    envoy.get("/page");
    hit_ttl(&envoy.get("/page"));
    assert_eq!(up.count("/page"), 1);

    let r = envoy.get_with("/page", &[("Cache-Control", "no-cache")]);
    assert_eq!(r.text(), "page");
    let cs = CacheStatus::of(&r);
    assert_eq!(cs.param("fwd"), Some("request"), "{cs:?}");
    assert_eq!(cs.param("fwd-status"), Some("200"), "{cs:?}");
    assert_eq!(up.count("/page"), 2, "no-cache must reach the origin");
}

#[test]
fn authorization_needs_an_explicit_shared_cache_permission() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/plain" => Reply::text("plain").header("Cache-Control", "max-age=60"),
        "/public" => Reply::text("public").header("Cache-Control", "public, max-age=60"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    let auth = [("Authorization", "Bearer token-1")];

    for n in 1..=2 {
        let r = envoy.get_with("/plain", &auth);
        assert_eq!(r.text(), "plain");
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=uri-miss; fwd-status=200; detail=authorization")
        );
        assert_eq!(up.count("/plain"), n);
    }

    let first = envoy.get_with("/public", &auth);
    assert_eq!(
        first.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );
    let second = envoy.get_with("/public", &auth);
    assert_eq!(second.text(), "public");
    hit_ttl(&second);
    assert_eq!(up.count("/public"), 1);
}

#[test]
fn stale_entry_is_forwarded_and_replaced() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/short" => Reply::text("short-lived").header("Cache-Control", "max-age=1"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    envoy.get("/short");
    hit_ttl(&envoy.get("/short"));
    assert_eq!(up.count("/short"), 1);

    thread::sleep(Duration::from_millis(2200));
    let stale = envoy.get("/short");
    assert_eq!(stale.text(), "short-lived");
    let cs = CacheStatus::of(&stale);
    assert_eq!(cs.param("fwd"), Some("stale"), "{cs:?}");
    assert_eq!(cs.param("fwd-status"), Some("200"), "{cs:?}");
    assert_eq!(up.count("/short"), 2, "a stale entry must not be served");

    // The fresh response replaced the entry.
    hit_ttl(&envoy.get("/short"));
    assert_eq!(up.count("/short"), 2);
}
