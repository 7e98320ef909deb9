//! The filter's HTTP caching semantics, end to end in a real Envoy: revalidation and
//! conditional requests (RFC 9111 §4.3, RFC 9110 §13), request directives (RFC 9111 §5.2.1),
//! stale-while-revalidate and stale-if-error (RFC 5861), invalidation (RFC 9111 §4.4),
//! heuristic freshness (RFC 9111 §4.2.2) and the Cache-Status values that report them
//! (RFC 9211). Each test has its own Envoy and origin; waits use `max-age=1` entries.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edge_filter_e2e::{
    poll, CacheStatus, Envoy, RecordedRequest, Reply, Response, Upstream, CACHE,
};

/// Long enough for a `max-age=1` entry to be stale: the filter counts age in whole seconds,
/// so one second after the response arrived its age is at least 1 and its ttl at most 0.
const PAST_MAX_AGE_1: Duration = Duration::from_millis(1100);

/// A fixed Last-Modified, long before any test runs.
const LAST_MODIFIED: &str = "Sat, 01 Jan 2022 00:00:00 GMT";
const DAY_BEFORE_LM: &str = "Fri, 31 Dec 2021 00:00:00 GMT";
const DAY_AFTER_LM: &str = "Sun, 02 Jan 2022 00:00:00 GMT";

/// The numeric `ttl` parameter of the filter's member.
fn ttl(r: &Response) -> i64 {
    let cs = CacheStatus::of(r);
    cs.param("ttl")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no numeric ttl in {cs:?}"))
}

/// `ttl` of a fresh hit, checking the exact `edge-filter; hit; ttl=<n>` shape.
fn hit_ttl(r: &Response) -> i64 {
    let t = ttl(r);
    assert_eq!(
        r.header("cache-status"),
        Some(format!("{CACHE}; hit; ttl={t}").as_str()),
        "fresh hit Cache-Status shape"
    );
    t
}

/// Asserts the `fwd` and `fwd-status` of a forwarded response.
fn assert_forwarded(r: &Response, fwd: &str, status: u16) {
    let cs = CacheStatus::of(r);
    assert!(!cs.has("hit"), "unexpected hit: {cs:?}");
    assert_eq!(cs.param("fwd"), Some(fwd), "{cs:?}");
    assert_eq!(
        cs.param("fwd-status"),
        Some(status.to_string().as_str()),
        "{cs:?}"
    );
}

/// How many GETs for `path` reached the origin (other methods are counted apart).
fn gets(up: &Upstream, path: &str) -> usize {
    seen(up, path).iter().filter(|r| r.method == "GET").count()
}

/// The requests for `path` the origin received, in order.
fn seen(up: &Upstream, path: &str) -> Vec<RecordedRequest> {
    up.requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Formats Unix seconds as an IMF-fixdate (RFC 9110 §5.6.7). Written here rather than
/// taken from the crate the filter parses dates with, so the two check each other.
fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian, eras of 400 years).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn http_date_formats_the_rfc_example() {
    // RFC 9110 §5.6.7's example, and a leap day.
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    assert_eq!(http_date(1_640_995_200), LAST_MODIFIED);
}

/// RFC 9111 §4.3.1-4: a stale entry is revalidated with its validators; a 304 freshens it
/// (headers updated, body kept) and the client gets the stored response; a 200 replaces it.
/// The client's own precondition on a stale entry gets the 304 and still freshens it.
#[test]
fn stale_entries_are_revalidated_and_freshened_by_304() {
    let up = Upstream::origin(|req| {
        let inm = req.headers.get("if-none-match");
        let ims = req.headers.get("if-modified-since");
        match req.path.as_str() {
            "/etag" if inm == Some("\"v1\"") => Reply::new(304)
                .header("ETag", "\"v1\"")
                .header("Cache-Control", "max-age=60")
                .header("X-Version", "2"),
            "/etag" => Reply::text("etag body")
                .header("ETag", "\"v1\"")
                .header("Cache-Control", "max-age=1")
                .header("X-Version", "1"),
            "/lm" if ims == Some(LAST_MODIFIED) => Reply::new(304)
                .header("Last-Modified", LAST_MODIFIED)
                .header("Cache-Control", "max-age=60")
                .header("X-Version", "2"),
            "/lm" => Reply::text("lm body")
                .header("Last-Modified", LAST_MODIFIED)
                .header("Cache-Control", "max-age=1")
                .header("X-Version", "1"),
            // A changed resource: the validator no longer matches, so a full 200.
            "/replace" if inm.is_some() => Reply::text("two")
                .header("ETag", "\"r2\"")
                .header("Cache-Control", "max-age=60"),
            "/replace" => Reply::text("one")
                .header("ETag", "\"r1\"")
                .header("Cache-Control", "max-age=1"),
            "/client" if inm == Some("\"c1\"") => Reply::new(304)
                .header("ETag", "\"c1\"")
                .header("Cache-Control", "max-age=60"),
            "/client" => Reply::text("client body")
                .header("ETag", "\"c1\"")
                .header("Cache-Control", "max-age=1"),
            _ => Reply::new(404),
        }
    });
    let envoy = Envoy::start(up.port(), "{}");
    for path in ["/etag", "/lm", "/replace", "/client"] {
        let r = envoy.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=uri-miss; fwd-status=200; stored"),
            "{path}"
        );
    }
    thread::sleep(PAST_MAX_AGE_1);

    for (path, body, validator, value) in [
        ("/etag", "etag body", "if-none-match", "\"v1\""),
        ("/lm", "lm body", "if-modified-since", LAST_MODIFIED),
    ] {
        let r = envoy.get(path);
        assert_eq!(r.status, 200, "{path}: the client asked unconditionally");
        assert_eq!(r.text(), body, "{path}: the stored body");
        assert_eq!(
            r.header("x-version"),
            Some("2"),
            "{path}: header from the 304"
        );
        assert_eq!(r.header("cache-control"), Some("max-age=60"), "{path}");
        let t = ttl(&r);
        assert!((58..=60).contains(&t), "{path}: ttl {t} after max-age=60");
        assert_eq!(
            r.header("cache-status"),
            Some(format!("edge-filter; fwd=stale; fwd-status=304; ttl={t}; stored").as_str()),
            "{path}"
        );
        let reqs = seen(&up, path);
        assert_eq!(reqs.len(), 2, "{path}");
        assert_eq!(
            reqs[0].headers.get(validator),
            None,
            "{path}: first request"
        );
        assert_eq!(
            reqs[1].headers.get(validator),
            Some(value),
            "{path}: the revalidation carries the stored validator"
        );

        // The freshened entry is served without the origin.
        let hit = envoy.get(path);
        assert_eq!(hit.text(), body);
        assert_eq!(
            hit.header("x-version"),
            Some("2"),
            "{path}: freshened headers"
        );
        let t = hit_ttl(&hit);
        assert!((57..=60).contains(&t), "{path}: ttl {t}");
        assert_eq!(up.count(path), 2, "{path}: the hit reached the origin");
    }

    // §4.3.3: a full response to the revalidation replaces the entry.
    let r = envoy.get("/replace");
    assert_eq!(r.text(), "two");
    assert_eq!(
        r.header("cache-status"),
        Some("edge-filter; fwd=stale; fwd-status=200; stored")
    );
    assert_eq!(
        seen(&up, "/replace")[1].headers.get("if-none-match"),
        Some("\"r1\"")
    );
    let hit = envoy.get("/replace");
    assert_eq!(hit.text(), "two");
    assert_eq!(hit.header("etag"), Some("\"r2\""));
    hit_ttl(&hit);
    assert_eq!(up.count("/replace"), 2);

    // §4.3.2: the client's own precondition goes upstream as sent and its 304 comes back,
    // while the 304 still freshens the entry for everyone else.
    let r = envoy.get_with("/client", &[("If-None-Match", "\"c1\"")]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(
        r.header("cache-status"),
        Some("edge-filter; fwd=stale; fwd-status=304; stored")
    );
    let after = envoy.get("/client");
    assert_eq!(
        after.status, 200,
        "a 304 must not be served to an unconditional GET"
    );
    assert_eq!(after.text(), "client body");
    let t = hit_ttl(&after);
    assert!(t > 50, "the 304's max-age=60 applies: ttl {t}");
    assert_eq!(up.count("/client"), 2);
}

/// RFC 9110 §13.1-13.2, RFC 9111 §4.3.2: preconditions against a fresh entry are evaluated
/// by the cache; a failed If-None-Match / If-Modified-Since is a 304 with the validator
/// fields, without a body. If-Match is not evaluated and goes to the origin.
#[test]
fn client_preconditions_are_answered_from_a_fresh_entry() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/doc" => Reply::text("the document")
            .header("ETag", "\"d1\"")
            .header("Last-Modified", LAST_MODIFIED)
            .header("Cache-Control", "max-age=60")
            .header("X-Extra", "1"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    let first = envoy.get("/doc");
    assert_eq!(first.status, 200);

    let not_modified: &[&[(&str, &str)]] = &[
        &[("If-None-Match", "\"d1\"")],
        // §13.1.2: If-None-Match uses the weak comparison.
        &[("If-None-Match", "W/\"d1\"")],
        &[("If-None-Match", "\"zz\", \"d1\"")],
        &[("If-None-Match", "*")],
        // §13.1.3: not modified since a date at or after Last-Modified.
        &[("If-Modified-Since", LAST_MODIFIED)],
        &[("If-Modified-Since", DAY_AFTER_LM)],
        // §13.2.2: If-None-Match decides; If-Modified-Since is ignored.
        &[
            ("If-None-Match", "\"d1\""),
            ("If-Modified-Since", DAY_BEFORE_LM),
        ],
    ];
    for headers in not_modified {
        let r = envoy.get_with("/doc", headers);
        assert_eq!(r.status, 304, "{headers:?}");
        assert!(r.body.is_empty(), "{headers:?}");
        assert_eq!(r.header("etag"), Some("\"d1\""), "§15.4.5: {headers:?}");
        assert_eq!(r.header("cache-control"), Some("max-age=60"), "{headers:?}");
        assert!(r.header("age").is_some(), "§5.1: a cached reply has Age");
        assert_eq!(
            r.header("x-extra"),
            None,
            "304 carries the validator fields only"
        );
        hit_ttl(&r);
    }

    let modified: &[&[(&str, &str)]] = &[
        &[("If-None-Match", "\"other\"")],
        &[("If-None-Match", "W/\"other\", \"d2\"")],
        &[("If-Modified-Since", DAY_BEFORE_LM)],
        &[("If-Modified-Since", "not a date")],
        &[
            ("If-None-Match", "\"other\""),
            ("If-Modified-Since", DAY_AFTER_LM),
        ],
    ];
    for headers in modified {
        let r = envoy.get_with("/doc", headers);
        assert_eq!(r.status, 200, "{headers:?}");
        assert_eq!(r.text(), "the document", "{headers:?}");
        assert_eq!(r.header("x-extra"), Some("1"));
        hit_ttl(&r);
    }
    assert_eq!(
        up.count("/doc"),
        1,
        "preconditions were evaluated by the cache"
    );

    // On the wire: nothing follows the head of the cache's 304.
    let raw = envoy.raw(
        b"GET /doc HTTP/1.1\r\nHost: edge.test\r\nIf-None-Match: \"d1\"\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&raw);
    let end = text.find("\r\n\r\n").expect("complete response head") + 4;
    assert!(text.starts_with("HTTP/1.1 304"), "{text}");
    assert_eq!(&text[end..], "", "a 304 carried a body");

    // §13.2.1: If-Match is for the origin to evaluate.
    let r = envoy.get_with("/doc", &[("If-Match", "\"d1\"")]);
    assert_eq!(r.status, 200);
    assert_forwarded(&r, "request", 200);
    let reqs = seen(&up, "/doc");
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].headers.get("if-match"), Some("\"d1\""));
}

/// RFC 9111 §4.3.2: a conditional request on a miss goes upstream as sent; the origin's 304
/// answers that client only and is never stored as the response to the URI.
#[test]
fn a_conditional_miss_does_not_poison_the_cache() {
    let up = Upstream::origin(|req| {
        let tagged = |r: Reply| {
            r.header("ETag", "\"p1\"")
                .header("Cache-Control", "max-age=60")
        };
        match req.path.as_str() {
            "/p" if req.headers.get("if-none-match") == Some("\"p1\"") => tagged(Reply::new(304)),
            "/p" => tagged(Reply::text("p body")),
            _ => Reply::new(404),
        }
    });
    let envoy = Envoy::start(up.port(), "{}");

    let r = envoy.get_with("/p", &[("If-None-Match", "\"p1\"")]);
    assert_eq!(r.status, 304);
    assert_eq!(
        r.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=304")
    );
    assert_eq!(
        seen(&up, "/p")[0].headers.get("if-none-match"),
        Some("\"p1\"")
    );

    let full = envoy.get("/p");
    assert_eq!(full.status, 200, "the origin's 304 was stored");
    assert_eq!(full.text(), "p body");
    assert_eq!(
        full.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );
    assert_eq!(seen(&up, "/p")[1].headers.get("if-none-match"), None);
    assert_eq!(up.count("/p"), 2);

    // Now stored: a hit for an unconditional GET, a 304 for the conditional one.
    let hit = envoy.get("/p");
    assert_eq!(hit.text(), "p body");
    hit_ttl(&hit);
    let nm = envoy.get_with("/p", &[("If-None-Match", "\"p1\"")]);
    assert_eq!(nm.status, 304);
    hit_ttl(&nm);
    assert_eq!(up.count("/p"), 2);
}

/// RFC 9111 §5.2.1 and §5.4: the request's own directives. One Envoy for all of them; the
/// `max-age=1` entries for max-stale go stale while the fresh-entry checks run.
#[test]
fn request_directives_control_reuse() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/nc" if req.headers.get("if-none-match") == Some("\"n1\"") => Reply::new(304)
            .header("ETag", "\"n1\"")
            .header("Cache-Control", "max-age=60"),
        "/nc" => Reply::text("nc body")
            .header("ETag", "\"n1\"")
            .header("Cache-Control", "max-age=60"),
        // Already 5 s old when it arrives (§4.2.3), so a request max-age below 5 refuses it.
        "/aged" => Reply::text("aged body")
            .header("Cache-Control", "max-age=60")
            .header("Age", "5"),
        "/pragma" | "/mf" | "/o" => {
            Reply::text(format!("body of {}", req.path)).header("Cache-Control", "max-age=60")
        }
        "/ms" => Reply::text("ms body").header("Cache-Control", "max-age=1"),
        "/mr" => Reply::text("mr body").header("Cache-Control", "max-age=1, must-revalidate"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    let only = [("Cache-Control", "only-if-cached")];

    // §5.2.1.7: only-if-cached never contacts the origin; nothing stored is a 504.
    let r = envoy.get_with("/o", &only);
    assert_eq!(r.status, 504);
    assert_eq!(r.header("cache-status"), Some("edge-filter; fwd=uri-miss"));
    assert_eq!(up.count("/o"), 0, "only-if-cached reached the origin");

    envoy.get("/ms");
    envoy.get("/mr");
    let stale_at = Instant::now() + PAST_MAX_AGE_1;
    for path in ["/nc", "/aged", "/pragma", "/mf", "/o"] {
        assert_eq!(envoy.get(path).status, 200, "{path}");
        hit_ttl(&envoy.get(path));
        assert_eq!(up.count(path), 1, "{path}");
    }

    let hit = envoy.get_with("/o", &only);
    assert_eq!(hit.status, 200);
    assert_eq!(hit.text(), "body of /o");
    hit_ttl(&hit);
    assert_eq!(up.count("/o"), 1);

    // §5.2.1.4: no-cache forwards; the cache validates with the stored ETag, and the 304
    // lets it answer with the stored response.
    let r = envoy.get_with("/nc", &[("Cache-Control", "no-cache")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "nc body");
    let t = ttl(&r);
    assert_eq!(
        r.header("cache-status"),
        Some(format!("edge-filter; fwd=request; fwd-status=304; ttl={t}; stored").as_str())
    );
    assert_eq!(
        seen(&up, "/nc")[1].headers.get("if-none-match"),
        Some("\"n1\"")
    );
    assert_eq!(up.count("/nc"), 2);

    // §5.2.1.1: max-age below the entry's age forwards; at or above it, reuse.
    let r = envoy.get_with("/aged", &[("Cache-Control", "max-age=0")]);
    assert_forwarded(&r, "request", 200);
    assert_eq!(up.count("/aged"), 2);
    let r = envoy.get_with("/aged", &[("Cache-Control", "max-age=30")]);
    assert_eq!(r.text(), "aged body");
    hit_ttl(&r);
    assert_eq!(up.count("/aged"), 2);

    // §5.4: Pragma: no-cache counts only without Cache-Control.
    let r = envoy.get_with("/pragma", &[("Pragma", "no-cache")]);
    assert_forwarded(&r, "request", 200);
    assert_eq!(up.count("/pragma"), 2);
    let r = envoy.get_with(
        "/pragma",
        &[("Pragma", "no-cache"), ("Cache-Control", "max-age=600")],
    );
    hit_ttl(&r);
    assert_eq!(up.count("/pragma"), 2);

    // §5.2.1.3: min-fresh asks for at least that much freshness left.
    let r = envoy.get_with("/mf", &[("Cache-Control", "min-fresh=120")]);
    assert_forwarded(&r, "request", 200);
    assert_eq!(up.count("/mf"), 2);
    let r = envoy.get_with("/mf", &[("Cache-Control", "min-fresh=10")]);
    hit_ttl(&r);
    assert_eq!(up.count("/mf"), 2);

    // §5.2.1.2: max-stale accepts a stale entry, §4.2.4: unless it said must-revalidate.
    if let Some(wait) = stale_at.checked_duration_since(Instant::now()) {
        thread::sleep(wait);
    }
    for directive in ["max-stale=60", "max-stale"] {
        let r = envoy.get_with("/ms", &[("Cache-Control", directive)]);
        assert_eq!(r.text(), "ms body");
        let cs = CacheStatus::of(&r);
        assert!(cs.has("hit"), "{directive}: {cs:?}");
        let t = ttl(&r);
        assert!(
            (-3..=0).contains(&t),
            "{directive}: a stale hit has ttl {t}"
        );
        assert_eq!(up.count("/ms"), 1, "{directive}");
    }
    let r = envoy.get_with("/mr", &[("Cache-Control", "max-stale=60")]);
    assert_eq!(r.text(), "mr body");
    assert_forwarded(&r, "stale", 200);
    assert_eq!(up.count("/mr"), 2);
}

/// RFC 5861 §3: within stale-while-revalidate the stale entry is served at once and one
/// background request refreshes it.
#[test]
fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let counters = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let c = Arc::clone(&counters);
    let up = Upstream::origin(move |req| {
        let n = match req.path.as_str() {
            "/swr" => c[0].fetch_add(1, Ordering::SeqCst) + 1,
            "/burst" => c[1].fetch_add(1, Ordering::SeqCst) + 1,
            _ => return Reply::new(404),
        };
        if n == 1 {
            return Reply::text("version 1")
                .header("Cache-Control", "max-age=1, stale-while-revalidate=30");
        }
        // The refresh is slow, so a client that waited for it would notice.
        thread::sleep(Duration::from_millis(1500));
        Reply::text(format!("version {n}"))
            .header("Cache-Control", "max-age=60, stale-while-revalidate=30")
    });
    let envoy = Envoy::start(up.port(), "{}");
    envoy.get("/swr");
    envoy.get("/burst");
    thread::sleep(PAST_MAX_AGE_1);

    let assert_stale = |r: &Response| {
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "version 1");
        let cs = CacheStatus::of(r);
        assert!(cs.has("hit"), "{cs:?}");
        assert_eq!(cs.param("detail"), Some("stale-while-revalidate"), "{cs:?}");
        let t = ttl(r);
        assert!((-30..=0).contains(&t), "stale ttl {t}");
    };

    let t0 = Instant::now();
    let r = envoy.get("/swr");
    let waited = t0.elapsed();
    assert_stale(&r);
    assert!(
        waited < Duration::from_secs(1),
        "the client waited {waited:?} for the refresh"
    );

    // Concurrent stale requests on another entry, at the same time.
    let barrier = Arc::new(Barrier::new(8));
    let burst: Vec<Response> = thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                let envoy = &envoy;
                s.spawn(move || {
                    barrier.wait();
                    envoy.get("/burst")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    burst.iter().for_each(assert_stale);

    // The refresh reaches the origin without the client...
    poll(Duration::from_secs(3), Duration::from_millis(20), || {
        (up.count("/swr") == 2).then_some(())
    })
    .expect("no background refresh reached the origin");
    let refresh = &seen(&up, "/swr")[1];
    assert_eq!(refresh.method, "GET");
    // ...and, once it is answered, the new response is a fresh hit.
    let fresh = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let r = envoy.get("/swr");
        if r.text() == "version 1" {
            assert_stale(&r);
            None
        } else {
            Some(r)
        }
    })
    .expect("the refreshed response was never served");
    assert_eq!(fresh.text(), "version 2");
    let t = hit_ttl(&fresh);
    assert!(t > 50, "ttl {t} after max-age=60");
    assert_eq!(
        up.count("/swr"),
        2,
        "more than one refresh for one stale entry"
    );

    let fresh = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let r = envoy.get("/burst");
        (r.text() != "version 1").then_some(r)
    })
    .expect("the burst entry was never refreshed");
    assert_eq!(fresh.text(), "version 2");
    hit_ttl(&fresh);
    assert_eq!(
        up.count("/burst"),
        2,
        "8 concurrent stale requests caused more than one refresh"
    );
}

/// RFC 5861 §4: within stale-if-error a stale entry replaces an upstream error (a 5xx from
/// the origin, or Envoy's own 503 when the origin is down); RFC 9111 §4.2.4: not when the
/// response said must-revalidate. Without the directive the error passes through, unless
/// the operator configured a grace period.
#[test]
fn stale_if_error_serves_stale_on_upstream_errors() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&failing);
    let mut up = Upstream::origin(move |req| {
        if f.load(Ordering::SeqCst) {
            return Reply::new(500).body("origin broke");
        }
        let cc = match req.path.as_str() {
            "/sie" => "max-age=1, stale-if-error=60",
            "/must" => "max-age=1, must-revalidate, stale-if-error=60",
            "/plain" => "max-age=1",
            _ => return Reply::new(404),
        };
        Reply::text(format!("stored {}", req.path)).header("Cache-Control", cc)
    });
    let envoy = Envoy::start(up.port(), "{}");
    let grace = Envoy::start(up.port(), r#"{"cache":{"stale_if_error_grace_secs":60}}"#);
    for path in ["/sie", "/must", "/plain"] {
        assert_eq!(envoy.get(path).status, 200);
    }
    assert_eq!(grace.get("/plain").status, 200);
    failing.store(true, Ordering::SeqCst);
    thread::sleep(PAST_MAX_AGE_1);

    let assert_stale_on_error = |r: &Response, path: &str, upstream: u16| {
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.text(), format!("stored {path}"));
        let t = ttl(r);
        assert!((-3..=0).contains(&t), "{path}: stale ttl {t}");
        assert_eq!(
            r.header("cache-status"),
            Some(
                format!(
                    "edge-filter; fwd=stale; fwd-status={upstream}; ttl={t}; detail=stale-if-error"
                )
                .as_str()
            ),
            "{path}"
        );
        assert!(r.header("age").is_some(), "{path}: a cached reply has Age");
    };

    // (a) the origin answers 500.
    let r = envoy.get("/sie");
    assert_stale_on_error(&r, "/sie", 500);
    assert_eq!(up.count("/sie"), 2, "the error came from the origin");

    // (c) must-revalidate forbids serving stale.
    let r = envoy.get("/must");
    assert_eq!(r.status, 500);
    assert_eq!(r.text(), "origin broke");
    assert_forwarded(&r, "stale", 500);

    // (d) no stale-if-error: the error passes, unless the operator allows a grace period.
    let r = envoy.get("/plain");
    assert_eq!(r.status, 500);
    assert_forwarded(&r, "stale", 500);
    let r = grace.get("/plain");
    assert_stale_on_error(&r, "/plain", 500);

    // (b) the origin is down: Envoy's 503 is replaced as well.
    up.stop();
    let r = envoy.get("/sie");
    assert_stale_on_error(&r, "/sie", 503);
    let r = envoy.get("/must");
    assert_eq!(r.status, 503, "must-revalidate with the origin down");
}

/// RFC 9111 §4.3.3 lets a cache answer a 5xx with a stored response; RFC 9211 §2.2 says
/// `fwd` is why the request went upstream. A fresh entry forwarded because of the request's
/// own directives (`no-cache`, `min-fresh`) was forwarded for `request`, not `stale`.
#[test]
fn error_fallback_on_a_fresh_entry_reports_the_request_as_the_reason() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&failing);
    let up = Upstream::origin(move |req| match req.path.as_str() {
        "/fresh" if f.load(Ordering::SeqCst) => Reply::new(500).body("origin broke"),
        "/fresh" => {
            Reply::text("fresh body").header("Cache-Control", "max-age=60, stale-if-error=60")
        }
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    envoy.get("/fresh");
    failing.store(true, Ordering::SeqCst);
    for directive in ["no-cache", "min-fresh=120"] {
        let r = envoy.get_with("/fresh", &[("Cache-Control", directive)]);
        assert_eq!(r.status, 200, "{directive}");
        assert_eq!(r.text(), "fresh body", "{directive}");
        assert_forwarded(&r, "request", 500);
        assert!(ttl(&r) > 0, "{directive}: the entry is fresh");
    }
    assert_eq!(up.count("/fresh"), 3);
}

/// RFC 9111 §4.4: a non-error response to an unsafe method invalidates the target URI and
/// same-origin Location / Content-Location; an error response invalidates nothing.
#[test]
fn unsafe_methods_invalidate_after_success() {
    let up = Upstream::origin(|req| match (req.method.as_str(), req.path.as_str()) {
        ("GET", _) => {
            Reply::text(format!("get {}", req.path)).header("Cache-Control", "max-age=60")
        }
        ("POST", "/res") => Reply::new(201).header("Location", "/other").body("created"),
        ("POST", "/keep") => Reply::new(500).body("failed"),
        (m, _) => Reply::new(200).body(format!("{m} saw {}", String::from_utf8_lossy(&req.body))),
    });
    let envoy = Envoy::start(up.port(), "{}");
    let paths = ["/res", "/other", "/keep"];
    for path in paths {
        envoy.get(path);
        hit_ttl(&envoy.get(path));
        assert_eq!(gets(&up, path), 1, "{path}");
    }

    let r = envoy.request("POST", "/res", &[], b"new");
    assert_eq!(r.status, 201);
    assert_forwarded(&r, "method", 201);
    for path in ["/res", "/other"] {
        let r = envoy.get(path);
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=uri-miss; fwd-status=200; stored"),
            "{path} was not invalidated"
        );
        assert_eq!(gets(&up, path), 2, "{path}");
    }

    let r = envoy.request("POST", "/keep", &[], b"x");
    assert_eq!(r.status, 500);
    assert_eq!(seen(&up, "/keep")[1].method, "POST");
    hit_ttl(&envoy.get("/keep"));
    assert_eq!(gets(&up, "/keep"), 1, "a failed POST invalidated /keep");

    // A method the cache does not know (WebDAV's LOCK) passes through untouched and
    // invalidates like any unsafe one.
    extension_method_passes_through_and_invalidates(&envoy, &up, "LOCK", "/lock");
}

/// Sends `method` with a body to `path` (stored beforehand) and checks that the origin got
/// it as sent and that its 2xx invalidated the entry.
fn extension_method_passes_through_and_invalidates(
    envoy: &Envoy,
    up: &Upstream,
    method: &str,
    path: &str,
) {
    envoy.get(path);
    hit_ttl(&envoy.get(path));
    assert_eq!(gets(up, path), 1, "{path}");
    let r = envoy.request(method, path, &[("Content-Type", "text/plain")], b"payload");
    assert_eq!(r.status, 200, "{method}: {}", r.text());
    assert_eq!(r.text(), format!("{method} saw payload"));
    assert_forwarded(&r, "method", 200);
    let reqs = seen(up, path);
    assert_eq!(reqs.len(), 2, "{method}");
    assert_eq!(reqs[1].method, method);
    assert_eq!(reqs[1].body, b"payload");
    assert_eq!(reqs[1].headers.get("content-type"), Some("text/plain"));
    let r = envoy.get(path);
    assert_forwarded(&r, "uri-miss", 200);
    assert_eq!(gets(up, path), 2, "{method} did not invalidate {path}");
}

/// RFC 9110 §9.1 / RFC 9111 §4.4 for a method no registry knows. Envoy's HTTP/1 codec
/// answers `FROB` with 400 (http1.codec_error) before any filter runs unless the listener
/// sets `http_protocol_options: { allow_custom_methods: true }`, which envoy/envoy.yaml
/// does not (yet).
#[test]
fn unregistered_method_passes_through_and_invalidates() {
    let up = Upstream::origin(|req| match req.method.as_str() {
        "GET" => Reply::text("stored").header("Cache-Control", "max-age=60"),
        m => Reply::new(200).body(format!("{m} saw {}", String::from_utf8_lossy(&req.body))),
    });
    let envoy = Envoy::start(up.port(), "{}");
    extension_method_passes_through_and_invalidates(&envoy, &up, "FROB", "/frob");
}

/// RFC 9111 §4.2.2: without explicit freshness, a fraction (10% by default) of the time
/// since Last-Modified.
#[test]
fn heuristic_freshness_from_last_modified() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/h" => {
            let now = unix_now();
            Reply::text("heuristic")
                .header("Date", &http_date(now))
                .header("Last-Modified", &http_date(now - 1000))
        }
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    let r = envoy.get("/h");
    assert_eq!(
        r.header("cache-status"),
        Some("edge-filter; fwd=uri-miss; fwd-status=200; stored")
    );
    let hit = envoy.get("/h");
    assert_eq!(hit.text(), "heuristic");
    let t = hit_ttl(&hit);
    assert!(
        (97..=100).contains(&t),
        "ttl {t}, expected about 100 (10% of 1000 s)"
    );
    assert_eq!(up.count("/h"), 1);
}

/// RFC 9111 §4.1: a Vary containing `*` never matches, so such responses are not stored.
#[test]
fn vary_with_star_is_never_stored() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/vs" => Reply::text("varies")
            .header("Cache-Control", "max-age=60")
            .header("Vary", "Accept-Encoding, *"),
        _ => Reply::new(404),
    });
    let envoy = Envoy::start(up.port(), "{}");
    for n in 1..=3 {
        let r = envoy.get("/vs");
        assert_eq!(r.text(), "varies");
        assert_eq!(
            r.header("cache-status"),
            Some("edge-filter; fwd=uri-miss; fwd-status=200; detail=vary-star")
        );
        assert_eq!(up.count("/vs"), n);
    }
}

/// RFC 9211 §2.7: the `key` parameter appears only when debugging is configured, as an
/// sf-string naming the normalised cache key.
#[test]
fn cache_status_key_only_when_configured() {
    let up = Upstream::origin(|req| match req.path.as_str() {
        "/k/./a?x=1" | "/k/a?x=1" => Reply::text("keyed").header("Cache-Control", "max-age=60"),
        _ => Reply::new(404),
    });
    let plain = Envoy::start(up.port(), "{}");
    let r = plain.get("/k/a?x=1");
    assert!(
        !r.header("cache-status").unwrap_or("").contains("key="),
        "no key by default: {:?}",
        r.header("cache-status")
    );
    let debug = Envoy::start(up.port(), r#"{"cache":{"cache_status_key":true}}"#);
    let miss = debug.get("/k/a?x=1");
    let hit = debug.get("/k/a?x=1");
    for r in [&miss, &hit] {
        let cs = r.header("cache-status").unwrap_or("");
        let key = CacheStatus::find(cs, "edge-filter")
            .and_then(|m| m.param("key").map(str::to_string))
            .unwrap_or_else(|| panic!("no key parameter in {cs:?}"));
        assert!(
            key.starts_with("\"http://") && key.ends_with("/k/a?x=1\""),
            "key is the normalised URI as an sf-string: {key}"
        );
    }
    assert!(CacheStatus::of(&hit).has("hit"));
}
