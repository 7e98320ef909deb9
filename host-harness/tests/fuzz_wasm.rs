//! Fuzzes the real edge_filter.wasm at the ABI boundary: generated request and response
//! heads (any byte in names, values, paths, hosts, methods, statuses; hostile values in
//! every header the cache reads; truncated, oversized and chunked bodies) over a few URLs,
//! two workers and a virtual clock, so that hits, variants, revalidation and purges happen.
//!
//! Every step must hold:
//! - (a) no trap;
//! - (b) bytes out equal bytes in: a forwarded response reaches the client byte for byte
//!   (only `cache-status` may differ), a stored one is served with header values the
//!   upstream sent for that key, and the request reaches the upstream unchanged except for
//!   validators the cache adds;
//! - (c) no stored entry served for another request: every upstream answer carries a marker
//!   naming the (:scheme, :authority, :path) it was produced for, and a served marker must
//!   name this request up to host case and a dropped default port;
//! - (d) a 304 to validators the filter added never reaches the client.
//!
//! `EDGE_FUZZ_CASES` (default 1000) or `EDGE_FUZZ_SECS` set the length, `EDGE_FUZZ_SEED` the
//! first case's seed (case n uses seed + n). Failures print the case seed and a shrunk
//! reproduction; the run continues to find the first failure of each kind.

use proxy_wasm_harness::abi::Pairs;
use proxy_wasm_harness::{CallReply, Harness, HttpCallResponse};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// envoy/envoy.yaml's plugin JSON with purge on. Entries are capped at 64 KiB (shipped:
/// 1 MiB) so that oversized bodies stay cheap to generate.
const CONFIG: &str = r#"{
  "cache": { "max_total_bytes": 67108864, "max_entry_bytes": 65536, "cache_status": true },
  "health": { "upstream_cluster": "upstream", "check_path": "/", "check_period_ms": 2000 },
  "purge": { "enabled": true, "token": "fuzz-token" }
}"#;
const MAX_ENTRY: usize = 65536;
const MARK: &str = "x-fuzz-origin";
/// Harness virtual time zero (its fixed start), for Date headers.
const START_SECS: u64 = 1_767_225_600;

/// The filter under test: `EDGE_FILTER_WASM`, else the workspace's release build.
fn wasm() -> PathBuf {
    edge_filter_e2e::envoy::wasm_path().unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------- PRNG (splitmix64)

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn pct(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    /// Hostile bytes: printable, any byte, obs-text, controls, empty or up to 16 KiB.
    fn junk(&mut self) -> Vec<u8> {
        let len = match self.below(10) {
            0 => 0,
            1 => self.range(1024, 16 * 1024),
            _ => self.range(1, 40),
        };
        let kind = self.below(4);
        (0..len)
            .map(|_| match kind {
                0 => self.range(0x20, 0x7e) as u8,
                1 => self.next() as u8,
                2 => self.range(0x80, 0xff) as u8,
                _ => *self.pick(b"\x00\x01\t\x7f\xff \"\\,;=a\xe9"),
            })
            .collect()
    }
}

// ---------------------------------------------------------------- the case model

#[derive(Clone, Debug)]
struct Req {
    method: Vec<u8>,
    scheme: Vec<u8>,
    authority: Vec<u8>,
    path: Vec<u8>,
    headers: Pairs,
}

#[derive(Clone, Debug)]
enum Length {
    Exact,
    Absent,
    /// Claims more than is sent: the body is cut off.
    Over(usize),
    Under(usize),
}

#[derive(Clone, Debug)]
struct Resp {
    status: Vec<u8>,
    headers: Pairs,
    /// Bytes after the marker line (0: no body at all).
    body_len: usize,
    length: Length,
    chunks: usize,
    /// Answer a conditional request 304 instead (an origin that honours validators).
    not_modified: bool,
}

#[derive(Clone, Debug)]
struct Step {
    worker: usize,
    advance_ms: u64,
    req: Req,
    resp: Resp,
}

type Case = Vec<Step>;

const PATHS: &[&[u8]] = &[
    b"/hello",
    b"/hello",
    b"/%68ello",
    b"/%68%65llo",
    b"/HELLO",
    b"/a/../hello",
    b"/./hello",
    b"/x/%2e%2e/hello",
    b"//hello",
    b"/hello?q",
    b"/hello?",
    b"/hello?q=%31",
    b"/hello?q=1",
    b"/hello/",
    b"/h\xc3\xa9llo",
    b"/h%C3%A9llo",
    b"/h\xe9llo",
    b"/%2fhello",
    b"/hello*",
    b"/*",
    b"/",
    b"hello",
    b"*",
    b"http://a.test/hello",
];

const HOSTS: &[&[u8]] = &[
    b"a.test",
    b"a.test",
    b"A.test",
    b"A.TEST",
    b"a.test:80",
    b"a.test:443",
    b"a.test.",
    b"a.test:",
    b"a.test:x",
    b"a.test:080",
    b"u@a.test",
    b"[::1]:80",
    b"[::1]",
    b"b.test",
    b"a.test:8080",
    b"",
];

fn one_of(rng: &mut Rng, xs: &[&str]) -> Vec<u8> {
    rng.pick(xs).as_bytes().to_vec()
}

fn number(rng: &mut Rng) -> Vec<u8> {
    match rng.below(8) {
        0 => b"99999999999999999999999".to_vec(),
        1 => b"-1".to_vec(),
        2 => b"4294967296".to_vec(),
        3 => b"18446744073709551616".to_vec(),
        _ => rng.range(0, 120).to_string().into_bytes(),
    }
}

fn http_date(secs: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

fn date(rng: &mut Rng, now: u64) -> Vec<u8> {
    match rng.below(8) {
        0 => rng.junk(),
        1 => b"Thu, 01 Jan 1970 00:00:00 GMT".to_vec(),
        2 => b"Sun, 06 Nov 1994 08:49:37 GMT\xff".to_vec(),
        3 => b"Sunday, 06-Nov-94 08:49:37 GMT".to_vec(),
        4 => b"Fri, 31 Dec 9999 23:59:59 GMT".to_vec(),
        _ => http_date((now as i64 + rng.range(0, 400) as i64 - 200).max(0) as u64).into_bytes(),
    }
}

fn cache_control(rng: &mut Rng) -> Vec<u8> {
    // Mostly plain, so that entries get stored and reused.
    if rng.pct(45) {
        let n = rng.range(1, 300);
        return match rng.below(3) {
            0 => format!("public, max-age={n}"),
            1 => format!("s-maxage={n}, stale-while-revalidate=30"),
            _ => format!("max-age={n}"),
        }
        .into_bytes();
    }
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for _ in 0..rng.range(1, 4) {
        let p = match rng.below(16) {
            0..=4 => [b"max-age=".to_vec(), number(rng)].concat(),
            5 => [b"s-maxage=".to_vec(), number(rng)].concat(),
            6 => one_of(rng, &["no-cache", "no-store", "private", "public"]),
            7 => one_of(
                rng,
                &["must-revalidate", "proxy-revalidate", "must-understand"],
            ),
            8 => [b"stale-while-revalidate=".to_vec(), number(rng)].concat(),
            9 => [b"stale-if-error=".to_vec(), number(rng)].concat(),
            10 => b"private=\"set-cookie, x-fuzz-origin\"".to_vec(),
            11 => b"no-cache=\"r\xe9sum\xe9\"".to_vec(),
            12 => b"max-age=\"60\"".to_vec(),
            13 => [b"max-age=\"".to_vec(), rng.junk(), b"\"".to_vec()].concat(),
            14 => b"max-age=60, max-age=0".to_vec(),
            _ => rng.junk(),
        };
        parts.push(p);
    }
    parts.join(&b", "[..])
}

fn etag(rng: &mut Rng) -> Vec<u8> {
    match rng.below(6) {
        0 => b"\"v1\"".to_vec(),
        1 => b"W/\"v1\"".to_vec(),
        2 => b"\"abcdef\xfc\"".to_vec(),
        3 => b"*".to_vec(),
        4 => b"\"v1\", \"v2\"".to_vec(),
        _ => rng.junk(),
    }
}

fn vary(rng: &mut Rng) -> Vec<u8> {
    match rng.below(7) {
        0..=2 => b"accept-language".to_vec(),
        3 => b"*".to_vec(),
        4 => b"accept-language, accept-encoding, x-a, x-b, x-c, x-d, x-e, x-f, x-g".to_vec(),
        5 => b"accept-language, \xe9t\xe9".to_vec(),
        _ => rng.junk(),
    }
}

fn header_name(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 => b"".to_vec(),
        1 => b":bogus".to_vec(),
        _ => rng.junk().to_ascii_lowercase(),
    }
}

fn req_headers(rng: &mut Rng, now: u64) -> Pairs {
    let mut h = Pairs::new();
    if rng.pct(50) {
        return h;
    }
    for _ in 0..rng.range(1, 5) {
        let (n, v): (&[u8], Vec<u8>) = match rng.below(16) {
            0 | 1 => (b"cache-control", cache_control(rng)),
            2 => (b"pragma", one_of(rng, &["no-cache", "x", ""])),
            3 => (b"if-none-match", etag(rng)),
            4 => (b"if-modified-since", date(rng, now)),
            5 => (b"authorization", one_of(rng, &["Bearer x", "Basic \u{e9}"])),
            6 | 7 => (
                b"accept-language",
                match rng.below(4) {
                    0 => b"de".to_vec(),
                    1 => b"fr\xe9".to_vec(),
                    2 => rng.junk(),
                    _ => b"en".to_vec(),
                },
            ),
            8 => (b"user-agent", rng.junk()),
            9 => (b"x-purge-token", b"fuzz-token".to_vec()),
            10 => (b"cookie", rng.junk()),
            11 => (b"accept-encoding", one_of(rng, &["gzip", "br, gzip"])),
            12 => (b"if-match", etag(rng)),
            13 => (b"content-length", number(rng)),
            _ => {
                h.push((header_name(rng), rng.junk()));
                continue;
            }
        };
        h.push((n.to_vec(), v));
    }
    h
}

fn resp_headers(rng: &mut Rng, now: u64) -> Pairs {
    let mut h = Pairs::new();
    if rng.pct(75) {
        h.push((b"cache-control".to_vec(), cache_control(rng)));
    }
    for _ in 0..rng.below(7) {
        let (n, v): (&[u8], Vec<u8>) = match rng.below(18) {
            0 | 1 => (b"date", date(rng, now)),
            2 => (b"age", number(rng)),
            3 => (b"expires", date(rng, now)),
            4 => (b"last-modified", date(rng, now)),
            5 => (b"cache-control", cache_control(rng)),
            6 => (b"pragma", one_of(rng, &["no-cache", ""])),
            7 | 8 => (b"vary", vary(rng)),
            9 | 10 => (b"etag", etag(rng)),
            11 => (b"set-cookie", rng.junk()),
            12 => (
                b"content-disposition",
                b"attachment; filename=\"r\xe9sum\xe9.pdf\"".to_vec(),
            ),
            13 => (b"content-type", rng.junk()),
            14 => (
                b"connection",
                one_of(rng, &["close", "x-fuzz-origin", "etag"]),
            ),
            15 => (b"location", one_of(rng, &["/hello", "http://a.test/hello"])),
            _ => {
                h.push((header_name(rng), rng.junk()));
                continue;
            }
        };
        h.push((n.to_vec(), v));
    }
    h
}

fn gen_case(seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    // A few URLs per case, so that requests meet in the cache.
    let paths: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            if i == 0 {
                b"/hello".to_vec()
            } else if rng.pct(10) {
                [b"/".to_vec(), rng.junk()].concat()
            } else {
                rng.pick(PATHS).to_vec()
            }
        })
        .collect();
    let hosts: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            if i == 0 {
                b"a.test".to_vec()
            } else if rng.pct(10) {
                rng.junk()
            } else {
                rng.pick(HOSTS).to_vec()
            }
        })
        .collect();
    // Some cases keep to ASCII, so that paths past a byte-level trap get explored too.
    let tame = rng.pct(40);
    let mut now = START_SECS;
    let mut case = Vec::new();
    for _ in 0..rng.range(3, 12) {
        let advance_ms = match rng.below(10) {
            0..=4 => 0,
            5..=7 => rng.range(100, 5000) as u64,
            _ => rng.range(30_000, 200_000) as u64,
        };
        now += advance_ms / 1000;
        let method = match rng.below(20) {
            0..=11 => b"GET".to_vec(),
            12 | 13 => b"HEAD".to_vec(),
            14 => b"POST".to_vec(),
            15 | 16 => b"PURGE".to_vec(),
            17 => one_of(&mut rng, &["get", "DELETE", "OPTIONS"]),
            _ => rng.junk(),
        };
        let mut path = rng.pick(&paths).clone();
        if method == b"PURGE" && rng.pct(30) {
            path.push(b'*');
        }
        let mut headers = req_headers(&mut rng, now);
        if method == b"PURGE" && rng.pct(80) {
            headers.push((b"x-purge-token".to_vec(), b"fuzz-token".to_vec()));
        }
        let req = Req {
            method,
            scheme: if rng.pct(85) {
                b"http".to_vec()
            } else {
                one_of(&mut rng, &["https", "HTTP", "ftp"])
            },
            authority: rng.pick(&hosts).clone(),
            path,
            headers,
        };
        let status = match rng.below(20) {
            0..=11 => b"200".to_vec(),
            12 => b"304".to_vec(),
            13 => b"404".to_vec(),
            14 => one_of(&mut rng, &["301", "203", "204", "206", "500", "503"]),
            15 | 16 => rng.range(100, 999).to_string().into_bytes(),
            17 => one_of(&mut rng, &["0200", "2000", "", "abc", "-200", " 200"]),
            _ => rng.junk(),
        };
        let body_len = match rng.below(10) {
            0 | 1 => 0,
            2 => rng.range(MAX_ENTRY, MAX_ENTRY + 8192),
            3 => rng.range(1024, 16 * 1024),
            _ => rng.range(1, 200),
        };
        let length = match rng.below(10) {
            0 => Length::Absent,
            1 => Length::Over(rng.range(1, 100)),
            2 => Length::Under(rng.range(1, 10)),
            _ => Length::Exact,
        };
        let resp = Resp {
            status,
            headers: resp_headers(&mut rng, now),
            body_len,
            length,
            chunks: rng.range(1, 4),
            not_modified: rng.pct(50),
        };
        let mut step = Step {
            worker: rng.below(2),
            advance_ms,
            req,
            resp,
        };
        if tame {
            tame_step(&mut step);
        }
        case.push(step);
    }
    case
}

fn tame_step(st: &mut Step) {
    let t = |b: &mut Vec<u8>| {
        for c in b.iter_mut() {
            if *c >= 0x80 {
                *c = b'?';
            }
        }
    };
    for b in [
        &mut st.req.method,
        &mut st.req.scheme,
        &mut st.req.authority,
        &mut st.req.path,
        &mut st.resp.status,
    ] {
        t(b);
    }
    for (k, v) in st.req.headers.iter_mut().chain(st.resp.headers.iter_mut()) {
        t(k);
        t(v);
    }
}

// ---------------------------------------------------------------- running a case

/// One answer the upstream produced (through the stream or an `http_call`).
#[derive(Clone, Debug)]
struct Sent {
    key: (Vec<u8>, Vec<u8>, Vec<u8>),
    headers: Pairs,
}

#[derive(Default)]
struct Origin {
    sent: BTreeMap<u64, Sent>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    s.chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok())
        .collect()
}

fn marker(serial: u64, key: &(Vec<u8>, Vec<u8>, Vec<u8>)) -> Vec<u8> {
    format!("{serial};{};{};{}", hex(&key.0), hex(&key.1), hex(&key.2)).into_bytes()
}

fn parse_marker(m: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(m).ok()?;
    let mut it = s.split(';');
    let serial = it.next()?.parse().ok()?;
    for _ in 0..3 {
        unhex(it.next()?.as_bytes())?;
    }
    Some(serial)
}

fn get<'a>(h: &'a Pairs, name: &[u8]) -> Option<&'a [u8]> {
    h.iter()
        .find(|(k, _)| k.as_slice() == name)
        .map(|(_, v)| v.as_slice())
}

/// The key as the cache may normalise it: scheme and host case, a default port dropped.
fn norm(key: &(Vec<u8>, Vec<u8>, Vec<u8>)) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let scheme = key.0.to_ascii_lowercase();
    let mut host = key.1.to_ascii_lowercase();
    let port: &[u8] = match scheme.as_slice() {
        b"http" => b":80",
        b"https" => b":443",
        _ => b"",
    };
    if !port.is_empty() && host.ends_with(port) {
        host.truncate(host.len() - port.len());
    }
    (scheme, host, key.2.clone())
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Trap,
    RequestBytes,
    ResponseBytes,
    Poisoned,
    Leaked304,
}

#[derive(Debug)]
struct Failure {
    kind: Kind,
    step: usize,
    what: String,
}

fn esc(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b.iter().take(200) {
        if (0x20..0x7f).contains(&c) && c != b'\\' && c != b'"' {
            s.push(c as char);
        } else {
            s.push_str(&format!("\\x{c:02x}"));
        }
    }
    if b.len() > 200 {
        s.push_str(&format!("...({} bytes)", b.len()));
    }
    s
}

fn show_pairs(h: &Pairs) -> String {
    h.iter()
        .map(|(k, v)| format!("\"{}\": \"{}\"", esc(k), esc(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn show(case: &Case) -> String {
    let mut s = String::new();
    for (i, st) in case.iter().enumerate() {
        s.push_str(&format!(
            "  step {i}: worker {} after +{} ms\n    request  {} {}://{}{} [{}]\n    response {} [{}] body {} bytes after the marker, {:?}, {} chunks{}\n",
            st.worker,
            st.advance_ms,
            esc(&st.req.method),
            esc(&st.req.scheme),
            esc(&st.req.authority),
            esc(&st.req.path),
            show_pairs(&st.req.headers),
            esc(&st.resp.status),
            show_pairs(&st.resp.headers),
            st.resp.body_len,
            st.resp.length,
            st.resp.chunks,
            if st.resp.not_modified {
                " (304 if conditional)"
            } else {
                ""
            },
        ));
    }
    s
}

fn key_of(h: &Pairs) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let f = |n: &[u8]| get(h, n).unwrap_or_default().to_vec();
    (f(b":scheme"), f(b":authority"), f(b":path"))
}

const VALIDATORS: [&[u8]; 2] = [b"if-none-match", b"if-modified-since"];

/// What the steps exercised, to show that the checks were reached.
#[derive(Default, Debug)]
struct Stats {
    forwarded: usize,
    served: usize,
    revalidated: usize,
    own_replies: usize,
}

fn run_case(wasm: &[u8], case: &Case, stats: &mut Stats) -> Result<(), Failure> {
    let origin = Arc::new(Mutex::new(Origin::default()));
    let serial = Arc::new(AtomicU64::new(1));
    let (o2, s2) = (origin.clone(), serial.clone());
    // Background refreshes and health checks: an ASCII answer, marked like the others.
    let h = Harness::from_bytes(wasm.to_vec())
        .vm_id("edge-filter")
        .plugin_config(CONFIG)
        .cluster("upstream", move |call| {
            let key = key_of(&call.headers);
            let n = s2.fetch_add(1, Ordering::SeqCst);
            let m = marker(n, &key);
            let mut r = HttpCallResponse::new(200, [b"@@", &m[..], b"@@\n"].concat());
            let ms = String::from_utf8(m).unwrap_or_default();
            r.headers
                .push(("cache-control".into(), format!("max-age={}", n % 90)));
            r.headers.push((MARK.into(), ms));
            let headers = r
                .headers
                .iter()
                .map(|(k, v)| (k.clone().into_bytes(), v.clone().into_bytes()))
                .collect();
            let sent = Sent { key, headers };
            o2.lock().unwrap().sent.insert(n, sent);
            CallReply::now(r)
        })
        .build()
        .expect("edge filter loads");
    let fail = |kind, step, what: String| Failure { kind, step, what };
    let trap = |step, e: &dyn std::fmt::Display| Failure {
        kind: Kind::Trap,
        step,
        what: format!("trap: {e}"),
    };
    let mut vms = [
        h.new_vm().map_err(|e| trap(0, &e))?,
        h.new_vm().map_err(|e| trap(0, &e))?,
    ];
    for (i, st) in case.iter().enumerate() {
        if st.advance_ms > 0 {
            let d = Duration::from_millis(st.advance_ms);
            vms[0].advance(d).map_err(|e| trap(i, &e))?;
            vms[1].advance(Duration::ZERO).map_err(|e| trap(i, &e))?;
        }
        let vm = &mut vms[st.worker];
        let mut req: Pairs = vec![
            (b":authority".to_vec(), st.req.authority.clone()),
            (b":path".to_vec(), st.req.path.clone()),
            (b":method".to_vec(), st.req.method.clone()),
            (b":scheme".to_vec(), st.req.scheme.clone()),
        ];
        req.extend(st.req.headers.iter().cloned());
        let head = st.req.method == b"HEAD";
        let mut s = vm.http_stream().map_err(|e| trap(i, &e))?;
        let id = s.id();
        let r = s.request_header_bytes(req.clone(), true);
        if let Err(e) = r {
            return Err(trap(i, &e));
        }
        // A paused request (coalescing) waits on the virtual clock.
        let mut waited = 0;
        while s.is_paused() && s.local_reply().is_none() && waited < 6000 {
            s.vm()
                .advance(Duration::from_millis(50))
                .map_err(|e| trap(i, &e))?;
            waited += 50;
        }
        let up = s.upstream_request().clone();
        let mut produced: Option<(u64, Vec<u8>, Pairs, Vec<u8>)> = None;
        if up.complete && s.local_reply().is_none() && s.reset().is_none() {
            let got = s
                .vm()
                .upstream_request_header_bytes(id)
                .cloned()
                .unwrap_or_default();
            let n = serial.fetch_add(1, Ordering::SeqCst);
            let key = key_of(&got);
            let m = marker(n, &key);
            let conditional = got.iter().any(|(k, _)| VALIDATORS.contains(&k.as_slice()));
            let status = if conditional && st.resp.not_modified {
                b"304".to_vec()
            } else {
                st.resp.status.clone()
            };
            let mut hs: Pairs = vec![(b":status".to_vec(), status.clone())];
            hs.extend(st.resp.headers.iter().cloned());
            hs.push((MARK.as_bytes().to_vec(), m.clone()));
            let mut body = Vec::new();
            if st.resp.body_len > 0 {
                body.extend_from_slice(b"@@");
                body.extend_from_slice(&m);
                body.extend_from_slice(b"@@\n");
                body.resize(body.len() + st.resp.body_len, b'x');
            }
            let claimed = match st.resp.length {
                Length::Exact => Some(body.len()),
                Length::Absent => None,
                Length::Over(k) => Some(body.len() + k),
                Length::Under(k) => Some(body.len().saturating_sub(k)),
            };
            if let Some(c) = claimed {
                hs.push((b"content-length".to_vec(), c.to_string().into_bytes()));
            }
            if head {
                body.clear();
            }
            origin.lock().unwrap().sent.insert(
                n,
                Sent {
                    key,
                    headers: hs.clone(),
                },
            );
            let r = s.response_header_bytes(hs.clone(), body.is_empty());
            if let Err(e) = r {
                return Err(trap(i, &e));
            }
            let k = st.resp.chunks.max(1);
            let size = body.len().div_ceil(k).max(1);
            let pieces: Vec<&[u8]> = body.chunks(size).collect();
            for (j, c) in pieces.iter().enumerate() {
                if let Err(e) = s.response_body(c, j + 1 == pieces.len()) {
                    return Err(trap(i, &e));
                }
            }
            produced = Some((n, status, hs, body));
        }
        let local = s.local_reply().is_some();
        if let Err(e) = s.finish() {
            return Err(trap(i, &e));
        }
        if let Some(t) = vm.failure() {
            return Err(trap(i, t));
        }
        let up_h = vm.upstream_request_header_bytes(id).cloned();
        let client_h = vm
            .client_response_header_bytes(id)
            .cloned()
            .unwrap_or_default();
        let client_body = vm
            .client_response(id)
            .map(|m| m.body.clone())
            .unwrap_or_default();

        // (b) the request reaches the upstream unchanged, but for added validators.
        let mut added_validators = false;
        if let Some(up_h) = &up_h {
            let client_has = req.iter().any(|(k, _)| VALIDATORS.contains(&k.as_slice()));
            let strip = |h: &Pairs| -> Pairs {
                h.iter()
                    .filter(|(k, _)| client_has || !VALIDATORS.contains(&k.as_slice()))
                    .cloned()
                    .collect()
            };
            added_validators =
                !client_has && up_h.iter().any(|(k, _)| VALIDATORS.contains(&k.as_slice()));
            if strip(up_h) != req {
                return Err(fail(
                    Kind::RequestBytes,
                    i,
                    format!(
                        "request changed on the way up:\n    sent     [{}]\n    upstream [{}]",
                        show_pairs(&req),
                        show_pairs(up_h)
                    ),
                ));
            }
        }
        let status = get(&client_h, b":status").unwrap_or_default().to_vec();
        // (d) a 304 to the filter's own validators stays with the filter.
        if added_validators && produced.as_ref().is_some_and(|p| p.1 == b"304") && status == b"304"
        {
            return Err(fail(
                Kind::Leaked304,
                i,
                "the upstream's 304 to validators the filter added reached the client".into(),
            ));
        }
        let cache_status = client_h
            .iter()
            .filter(|(k, _)| k == b"cache-status")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        stats.revalidated += usize::from(added_validators);
        let passthrough = match &produced {
            Some((_, st_sent, _, _)) => {
                let stored_answer = local
                    || cache_status.contains("hit")
                    || cache_status.contains("stale-if-error")
                    || (added_validators && st_sent == b"304");
                !stored_answer
            }
            None => false,
        };
        let without = |h: &Pairs| -> Pairs {
            h.iter()
                .filter(|(k, _)| k != b"cache-status")
                .cloned()
                .collect()
        };
        if passthrough {
            stats.forwarded += 1;
            let (_, _, hs, body) = produced.as_ref().expect("produced");
            if without(&client_h) != without(hs) {
                return Err(fail(
                    Kind::ResponseBytes,
                    i,
                    format!(
                        "forwarded response changed:\n    upstream [{}]\n    client   [{}]",
                        show_pairs(hs),
                        show_pairs(&client_h)
                    ),
                ));
            }
            if client_body != *body {
                return Err(fail(
                    Kind::ResponseBytes,
                    i,
                    format!(
                        "forwarded body changed: {} bytes sent, {} received",
                        body.len(),
                        client_body.len()
                    ),
                ));
            }
            continue;
        }
        // (c) served from the store: every marker names this request.
        let mine = norm(&(
            st.req.scheme.clone(),
            st.req.authority.clone(),
            st.req.path.clone(),
        ));
        let origin = origin.lock().unwrap();
        let mut marks: Vec<u64> = Vec::new();
        for (k, v) in &client_h {
            if k == MARK.as_bytes() {
                match parse_marker(v) {
                    Some(n) => marks.push(n),
                    None => {
                        return Err(fail(
                            Kind::ResponseBytes,
                            i,
                            format!("marker header mangled: \"{}\"", esc(v)),
                        ))
                    }
                }
            }
        }
        if let Some(rest) = client_body.strip_prefix(b"@@") {
            let end = rest.windows(2).position(|w| w == b"@@").unwrap_or(0);
            match parse_marker(&rest[..end]) {
                Some(n) => marks.push(n),
                None => {
                    return Err(fail(
                        Kind::ResponseBytes,
                        i,
                        format!("body marker mangled: \"{}\"", esc(&client_body)),
                    ))
                }
            }
        }
        for n in &marks {
            let Some(sent) = origin.sent.get(n) else {
                return Err(fail(Kind::Poisoned, i, format!("unknown marker {n}")));
            };
            if norm(&sent.key) != mine {
                return Err(fail(
                    Kind::Poisoned,
                    i,
                    format!(
                        "served the answer for {}://{}{} to a request for {}://{}{}; cache-status \"{cache_status}\"",
                        esc(&sent.key.0),
                        esc(&sent.key.1),
                        esc(&sent.key.2),
                        esc(&st.req.scheme),
                        esc(&st.req.authority),
                        esc(&st.req.path),
                    ),
                ));
            }
        }
        if marks.is_empty() {
            stats.own_replies += 1; // The filter's own answer (purge, health, 504, 403...).
            continue;
        }
        stats.served += 1;
        // (b) a stored answer's header values are bytes the upstream sent for this key.
        let allowed: std::collections::HashSet<&(Vec<u8>, Vec<u8>)> = origin
            .sent
            .values()
            .filter(|s| norm(&s.key) == mine)
            .flat_map(|s| s.headers.iter())
            .collect();
        for pair in &client_h {
            let k = pair.0.as_slice();
            if k.starts_with(b":")
                || k == b"cache-status"
                || k == b"age"
                || k == b"content-length"
                || (k == b"content-type" && pair.1 == b"text/plain")
            {
                continue;
            }
            if !allowed.contains(pair) {
                let elsewhere = origin.sent.values().find(|s| s.headers.contains(pair));
                if let Some(other) = elsewhere {
                    return Err(fail(
                        Kind::Poisoned,
                        i,
                        format!(
                            "served header \"{}: {}\" from the answer for {}://{}{} to a request for {}://{}{}; cache-status \"{cache_status}\"",
                            esc(&pair.0),
                            esc(&pair.1),
                            esc(&other.key.0),
                            esc(&other.key.1),
                            esc(&other.key.2),
                            esc(&st.req.scheme),
                            esc(&st.req.authority),
                            esc(&st.req.path),
                        ),
                    ));
                }
                return Err(fail(
                    Kind::ResponseBytes,
                    i,
                    format!(
                        "served header \"{}: {}\" is not what the upstream sent for this URL; cache-status \"{cache_status}\"",
                        esc(&pair.0),
                        esc(&pair.1)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Greedy shrink: drop steps, then headers, then simplify bodies, keeping the failure kind.
fn shrink(wasm: &[u8], case: &Case, kind: &Kind) -> Case {
    let fails =
        |c: &Case| matches!(run_case(wasm, c, &mut Stats::default()), Err(f) if f.kind == *kind);
    let mut best = case.clone();
    let mut budget = 400;
    let mut progress = true;
    while progress && budget > 0 {
        progress = false;
        let mut i = 0;
        while i < best.len() && budget > 0 {
            let mut c = best.clone();
            c.remove(i);
            budget -= 1;
            if !c.is_empty() && fails(&c) {
                best = c;
                progress = true;
            } else {
                i += 1;
            }
        }
        for i in 0..best.len() {
            for resp in [false, true] {
                let mut j = 0;
                loop {
                    let len = if resp {
                        best[i].resp.headers.len()
                    } else {
                        best[i].req.headers.len()
                    };
                    if j >= len || budget == 0 {
                        break;
                    }
                    let mut c = best.clone();
                    if resp {
                        c[i].resp.headers.remove(j);
                    } else {
                        c[i].req.headers.remove(j);
                    }
                    budget -= 1;
                    if fails(&c) {
                        best = c;
                        progress = true;
                    } else {
                        j += 1;
                    }
                }
            }
            if budget > 0 && (best[i].resp.body_len > 8 || best[i].advance_ms > 0) {
                let mut c = best.clone();
                c[i].resp.body_len = c[i].resp.body_len.min(8);
                c[i].resp.chunks = 1;
                c[i].advance_ms = 0;
                budget -= 1;
                if fails(&c) {
                    best = c;
                    progress = true;
                }
            }
        }
    }
    best
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

#[test]
fn fuzz_the_real_filter_at_the_abi_boundary() {
    let wasm = std::fs::read(wasm()).expect("read the wasm");
    let secs = env_u64("EDGE_FUZZ_SECS");
    let cases = env_u64("EDGE_FUZZ_CASES").unwrap_or(if secs.is_some() { u64::MAX } else { 1000 });
    let base = env_u64("EDGE_FUZZ_SEED").unwrap_or(0xed6e_f117);
    let t0 = Instant::now();
    // The first harness compiles the module (shared by the rest): timed apart.
    Harness::from_bytes(wasm.clone())
        .plugin_config(CONFIG)
        .build()
        .expect("edge filter loads");
    let compiled = t0.elapsed();
    let t1 = Instant::now();
    let deadline = secs.map(|s| t0 + Duration::from_secs(s));
    let mut found: BTreeMap<Kind, (u64, usize)> = BTreeMap::new();
    // Distinct first lines per kind, to tell one bug from several.
    let mut variants: BTreeMap<(Kind, String), (u64, usize)> = BTreeMap::new();
    let (mut run, mut steps) = (0u64, 0usize);
    let mut stats = Stats::default();
    while run < cases && deadline.is_none_or(|d| Instant::now() < d) {
        let seed = base.wrapping_add(run);
        let case = gen_case(seed);
        steps += case.len();
        run += 1;
        if let Err(f) = run_case(&wasm, &case, &mut stats) {
            found.entry(f.kind.clone()).or_insert((seed, 0)).1 += 1;
            let sig: String = f
                .what
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect();
            variants.entry((f.kind, sig)).or_insert((seed, 0)).1 += 1;
        }
        if secs.is_some() && run % 1000 == 0 {
            eprintln!(
                "fuzz_wasm: {run} cases, {:.0} s, failures {:?}",
                t1.elapsed().as_secs_f64(),
                found
            );
        }
    }
    let spent = t1.elapsed();
    let mut report = String::new();
    for (kind, (seed, count)) in &found {
        let case = gen_case(*seed);
        let small = shrink(&wasm, &case, kind);
        let f = run_case(&wasm, &small, &mut Stats::default()).err();
        report.push_str(&format!(
            "\n{kind:?}: {count} case(s), first seed {seed:#x} (rerun: EDGE_FUZZ_SEED={seed:#x} EDGE_FUZZ_CASES=1)\n"
        ));
        if let Some(f) = f {
            report.push_str(&format!("  at step {}: {}\n", f.step, f.what));
        }
        report.push_str(&format!("  shrunk case:\n{}", show(&small)));
        let mine: Vec<_> = variants.iter().filter(|((k, _), _)| k == kind).collect();
        report.push_str(&format!("  {} distinct message(s):\n", mine.len()));
        for ((_, sig), (seed, n)) in mine.iter().take(12) {
            report.push_str(&format!("    {n:>4} x, first seed {seed:#x}: {sig}\n"));
        }
    }
    println!(
        "fuzz_wasm: seed {base:#x}, {run} cases ({steps} steps) in {:.1} s, {:.2} ms per case (module compile {:.1} s); checked: {} forwarded, {} served from the store, {} revalidations, {} filter replies; failing cases: {}",
        spent.as_secs_f64(),
        spent.as_secs_f64() * 1000.0 / run.max(1) as f64,
        compiled.as_secs_f64(),
        stats.forwarded,
        stats.served,
        stats.revalidated,
        stats.own_replies,
        found.values().map(|v| v.1).sum::<usize>()
    );
    assert!(found.is_empty(), "fuzz_wasm found failures:{report}");
}
