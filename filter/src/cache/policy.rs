//! Cache decisions: may a request use the cache (RFC 9111 §4), may a response be stored (§3),
//! and may a stored response answer a request (§4.2, §5.2.1).

use super::cache_control::CacheControl;
use super::entry::{flags, ResponseMeta, ResponseView};
use super::freshness;
use super::vary::Vary;

/// A header map as the glue reads it: (name, value) pairs, names lower-case as HTTP/2 and
/// Envoy give them.
pub type Headers = [(String, String)];

/// Every value of `name` in `h`, in order (names compared case-insensitively).
pub fn values<'a>(h: &'a Headers, name: &str) -> Vec<&'a str> {
    h.iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn has(h: &Headers, name: &str) -> bool {
    h.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// Why a request did not look in the cache; the RFC 9211 `fwd` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// The cache was not consulted (disabled, unkeyable target).
    Bypass,
    /// The method is not answered from the cache.
    Method,
    /// Nothing stored for the URI.
    UriMiss,
    /// Something stored for the URI, but not for this request's `Vary` values.
    VaryMiss,
    /// The stored response could not be used (stale, or needs validation).
    Stale,
    /// The request's own directives forbade reuse (`no-cache`, `max-age`, ...).
    Request,
}

impl Forward {
    /// The RFC 9211 `fwd` parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Forward::Bypass => "bypass",
            Forward::Method => "method",
            Forward::UriMiss => "uri-miss",
            Forward::VaryMiss => "vary-miss",
            Forward::Stale => "stale",
            Forward::Request => "request",
        }
    }
}

/// Why a response was not stored; the `Cache-Status` `detail` value and a log label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// HEAD responses have no body to store.
    Head,
    /// The request said `no-store` (§5.2.1.5).
    RequestNoStore,
    /// Status not in the configured set.
    Status,
    /// Response `no-store` (§5.2.2.5).
    NoStore,
    /// Unqualified `private` (§5.2.2.7).
    Private,
    /// Request had `Authorization`, response did not allow sharing (§3.5).
    Authorization,
    /// `Set-Cookie` without `private="set-cookie"`: never shared between users.
    SetCookie,
    /// `Vary: *` (§4.1) or an unusable `Vary`.
    VaryStar,
    /// No explicit freshness and nothing to validate with.
    NoFreshness,
    /// Larger than the entry limit.
    TooLarge,
    /// The upstream ended the body early.
    Truncated,
    /// The store refused (limits, contention).
    StoreFull,
}

impl NotStored {
    /// Label for `Cache-Status` `detail`, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::Head => "head",
            NotStored::RequestNoStore => "request-no-store",
            NotStored::Status => "status",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::Authorization => "authorization",
            NotStored::SetCookie => "set-cookie",
            NotStored::VaryStar => "vary-star",
            NotStored::NoFreshness => "no-freshness",
            NotStored::TooLarge => "too-large",
            NotStored::Truncated => "truncated",
            NotStored::StoreFull => "store-full",
        }
    }
}

/// What the request's own headers allow (RFC 9111 §5.2.1, §3.5).
#[derive(Debug, Clone, Default)]
pub struct RequestPolicy {
    /// Parsed request `Cache-Control`.
    pub cc: CacheControl,
    /// `no-cache` (or `Pragma: no-cache` without `Cache-Control`, §5.4): no reuse without
    /// validation.
    pub no_cache: bool,
    /// The request carries `Authorization` (§3.5).
    pub authorization: bool,
}

impl RequestPolicy {
    /// Reads the request headers.
    pub fn from_request(req: &Headers) -> RequestPolicy {
        let cc_lines = values(req, "cache-control");
        let cc = CacheControl::parse(cc_lines.iter().copied());
        // §5.4: Pragma: no-cache counts only when Cache-Control is absent.
        let pragma_no_cache = cc_lines.is_empty()
            && values(req, "pragma")
                .iter()
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("no-cache"));
        RequestPolicy {
            no_cache: cc.no_cache.is_some() || pragma_no_cache,
            authorization: has(req, "authorization"),
            cc,
        }
    }
}

/// A stored response's verdict for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Serve it; `ttl` is freshness left in seconds (negative when serving stale is allowed).
    Fresh {
        /// Current age (§4.2.3).
        age: u64,
        /// Seconds of freshness left.
        ttl: i64,
    },
    /// Cannot be served; forward with this reason.
    Forward(Forward),
}

/// RFC 9111 §4.2 and §5.2.1: may `stored` answer a request with `req` at `now`?
pub fn reuse(stored: &ResponseMeta, req: &RequestPolicy, now: u64) -> Reuse {
    // §3.5: shared responses to Authorization requests need explicit permission.
    if req.authorization && !stored.has(flags::AUTH_OK) {
        return Reuse::Forward(Forward::Request);
    }
    if req.no_cache {
        return Reuse::Forward(Forward::Request);
    }
    let age = freshness::current_age(u64::from(stored.initial_age), stored.response_time, now);
    let lifetime = u64::from(stored.lifetime);
    let ttl = lifetime as i64 - age as i64;
    // §5.2.2.4: unqualified no-cache needs validation before every reuse.
    if stored.has(flags::REQUIRES_VALIDATION) {
        return Reuse::Forward(Forward::Stale);
    }
    // §5.2.1.1: the client will not accept a response older than max-age.
    if let Some(max_age) = req.cc.max_age.seconds() {
        if age > u64::from(max_age) {
            return Reuse::Forward(Forward::Request);
        }
    } else if req.cc.max_age.is_present() {
        return Reuse::Forward(Forward::Request);
    }
    if ttl > 0 {
        // §5.2.1.3: min-fresh asks for that much freshness left.
        if let Some(min_fresh) = req.cc.min_fresh.seconds() {
            if ttl < i64::from(min_fresh) {
                return Reuse::Forward(Forward::Request);
            }
        }
        return Reuse::Fresh { age, ttl };
    }
    // Stale. §4.2.4: serve only where the client allows it (max-stale) and the response does
    // not forbid it (must-revalidate, proxy-revalidate, s-maxage).
    if !stored.has(flags::FORBIDS_STALE) {
        if let Some(limit) = req.cc.max_stale {
            if limit.is_none_or(|l| -ttl <= i64::from(l)) {
                return Reuse::Fresh { age, ttl };
            }
        }
    }
    Reuse::Forward(Forward::Stale)
}

/// A response that may be stored, with what to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Storable {
    /// Status, flags, age and lifetime.
    pub meta: ResponseMeta,
    /// The header fields to store (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The response's `Vary`.
    pub vary: Vary,
}

/// Inputs to [`storable`] besides the headers.
#[derive(Debug, Clone, Copy)]
pub struct StoreContext<'a> {
    /// The request is HEAD (nothing to store).
    pub head: bool,
    /// The request's policy.
    pub request: &'a RequestPolicy,
    /// Statuses that may be stored.
    pub statuses: &'a [u16],
    /// Largest entry body.
    pub max_entry_bytes: u64,
    /// When the request was sent upstream (Unix seconds).
    pub request_time: u64,
    /// When the response headers arrived.
    pub response_time: u64,
}

/// RFC 9111 §3: may this response be stored? `resp` excludes pseudo-headers.
pub fn storable(
    status: u16,
    resp: &Headers,
    ctx: &StoreContext<'_>,
) -> Result<Storable, NotStored> {
    if ctx.head {
        return Err(NotStored::Head);
    }
    // §5.2.1.5: request no-store forbids storing the response too.
    if ctx.request.cc.no_store {
        return Err(NotStored::RequestNoStore);
    }
    if !ctx.statuses.contains(&status) {
        return Err(NotStored::Status);
    }
    let cc = CacheControl::parse(values(resp, "cache-control"));
    if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if matches!(&cc.private, Some(f) if f.is_empty()) {
        return Err(NotStored::Private);
    }
    let auth_ok = cc.public || cc.s_maxage.is_present() || cc.must_revalidate;
    if ctx.request.authorization && !auth_ok {
        return Err(NotStored::Authorization);
    }
    let withheld: Vec<&str> = cc.withheld_fields().collect();
    if has(resp, "set-cookie") && !withheld.contains(&"set-cookie") {
        return Err(NotStored::SetCookie);
    }
    let vary = Vary::parse(values(resp, "vary"));
    if matches!(vary, Vary::Star | Vary::Unusable) {
        return Err(NotStored::VaryStar);
    }
    let date_lines = values(resp, "date");
    let lifetime = freshness::freshness_lifetime(
        &cc,
        &values(resp, "expires"),
        &date_lines,
        ctx.response_time,
    );
    let has_validator = has(resp, "etag") || has(resp, "last-modified");
    let lifetime = match lifetime {
        Some((l, _)) => l,
        // Heuristic freshness is not applied; a no-cache response with a validator is kept
        // so that it can be revalidated.
        None if cc.requires_validation() && has_validator => 0,
        None => return Err(NotStored::NoFreshness),
    };
    if let Some(len) = content_length(resp) {
        if len > ctx.max_entry_bytes {
            return Err(NotStored::TooLarge);
        }
    }
    let initial_age = freshness::corrected_initial_age(
        freshness::single_date(&date_lines),
        freshness::age_value(&values(resp, "age")),
        ctx.request_time,
        ctx.response_time,
    );
    let mut f = 0;
    if cc.requires_validation() {
        f |= flags::REQUIRES_VALIDATION;
    }
    if cc.forbids_stale() {
        f |= flags::FORBIDS_STALE;
    }
    if auth_ok {
        f |= flags::AUTH_OK;
    }
    Ok(Storable {
        headers: stored_headers(resp, &withheld),
        meta: ResponseMeta {
            status,
            flags: f,
            response_time: ctx.response_time,
            initial_age: initial_age.min(u64::from(u32::MAX)) as u32,
            lifetime: lifetime.min(u64::from(u32::MAX)) as u32,
        },
        vary,
    })
}

/// The declared body length, when there is exactly one valid `Content-Length`.
pub fn content_length(resp: &Headers) -> Option<u64> {
    match values(resp, "content-length").as_slice() {
        [one] => one.trim().parse().ok(),
        _ => None,
    }
}

/// Fields never stored: hop-by-hop (RFC 9110 §7.6.1, RFC 9111 §3.1), values the cache
/// recomputes (`age`, `content-length`, `cache-status`), and the proxy's own per-request
/// fields.
fn is_unstored(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authentication-info"
            | "age"
            | "content-length"
            | "cache-status"
    ) || name.starts_with(':')
        || name.starts_with("x-envoy-")
}

/// The header fields to keep, in order, lower-cased; skips those named by `Connection`
/// (§3.1) and the `withheld` qualified private/no-cache fields (§5.2.2.4, §5.2.2.7).
pub fn stored_headers(resp: &Headers, withheld: &[&str]) -> Vec<(String, String)> {
    let connection: Vec<String> = values(resp, "connection")
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    resp.iter()
        .filter_map(|(n, v)| {
            let n = n.to_ascii_lowercase();
            let drop = is_unstored(&n) || connection.contains(&n) || withheld.contains(&n.as_str());
            (!drop).then(|| (n, v.clone()))
        })
        .collect()
}

/// A stored response's headers as served, for building a local reply: the stored fields,
/// then `Age` (RFC 9111 §5.1, always sent on a hit).
pub fn hit_headers<'a>(r: &ResponseView<'a>, age: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut h = Vec::with_capacity(r.headers.len() + 2);
    h.extend(r.headers.iter().copied());
    h.push(("age", age));
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000;

    fn hdrs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn ctx(req: &RequestPolicy) -> StoreContext<'_> {
        StoreContext {
            head: false,
            request: req,
            statuses: &[200, 301, 404],
            max_entry_bytes: 1000,
            request_time: T - 1,
            response_time: T,
        }
    }

    fn store(status: u16, list: &[(&str, &str)]) -> Result<Storable, NotStored> {
        let req = RequestPolicy::default();
        storable(status, &hdrs(list), &ctx(&req))
    }

    #[test]
    fn max_age_response_is_stored_with_its_lifetime() {
        // RFC 9111 §3: explicit freshness makes a 200 storable.
        let s = store(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("content-type", "text/plain"),
            ],
        )
        .unwrap();
        assert_eq!(s.meta.lifetime, 60);
        assert_eq!(s.meta.initial_age, 1, "response_delay counts (§4.2.3)");
        assert_eq!(s.vary, Vary::None);
    }

    #[test]
    fn no_store_private_and_status_are_refused() {
        // RFC 9111 §3, §5.2.2.5, §5.2.2.7
        assert_eq!(
            store(200, &[("cache-control", "no-store, max-age=5")]),
            Err(NotStored::NoStore)
        );
        assert_eq!(
            store(200, &[("cache-control", "private, max-age=5")]),
            Err(NotStored::Private)
        );
        assert_eq!(
            store(500, &[("cache-control", "max-age=5")]),
            Err(NotStored::Status)
        );
        assert_eq!(
            store(200, &[("content-type", "x")]),
            Err(NotStored::NoFreshness)
        );
    }

    #[test]
    fn qualified_private_strips_the_named_fields() {
        // RFC 9111 §5.2.2.7: a shared cache may store the response without those fields.
        let s = store(
            200,
            &[
                ("cache-control", "private=\"set-cookie\", max-age=5"),
                ("set-cookie", "a=b"),
                ("x", "1"),
            ],
        )
        .unwrap();
        assert!(s.headers.iter().all(|(n, _)| n != "set-cookie"));
        assert!(s.headers.iter().any(|(n, _)| n == "x"));
    }

    #[test]
    fn set_cookie_is_not_shared() {
        assert_eq!(
            store(
                200,
                &[("cache-control", "max-age=5"), ("set-cookie", "s=1")]
            ),
            Err(NotStored::SetCookie)
        );
    }

    #[test]
    fn vary_star_is_never_stored() {
        // RFC 9111 §4.1
        assert_eq!(
            store(
                200,
                &[("cache-control", "max-age=5"), ("vary", "accept, *")]
            ),
            Err(NotStored::VaryStar)
        );
    }

    #[test]
    fn authorization_needs_explicit_permission() {
        // RFC 9111 §3.5: public, s-maxage or must-revalidate.
        let req = RequestPolicy {
            authorization: true,
            ..Default::default()
        };
        let c = ctx(&req);
        let r = |cc: &str| storable(200, &hdrs(&[("cache-control", cc)]), &c);
        assert_eq!(r("max-age=5"), Err(NotStored::Authorization));
        assert!(r("public, max-age=5").is_ok());
        assert!(r("s-maxage=5").is_ok());
        assert!(r("must-revalidate, max-age=5").is_ok());
        let stored = r("public, max-age=5").unwrap().meta;
        assert!(stored.has(flags::AUTH_OK));
        let plain = store(200, &[("cache-control", "max-age=5")]).unwrap().meta;
        assert_eq!(reuse(&plain, &req, T), Reuse::Forward(Forward::Request));
        assert!(matches!(reuse(&stored, &req, T), Reuse::Fresh { .. }));
    }

    #[test]
    fn request_no_store_and_head_are_not_stored() {
        // RFC 9111 §5.2.1.5
        let req = RequestPolicy::from_request(&hdrs(&[("cache-control", "no-store")]));
        let resp = hdrs(&[("cache-control", "max-age=5")]);
        assert_eq!(
            storable(200, &resp, &ctx(&req)),
            Err(NotStored::RequestNoStore)
        );
        let req = RequestPolicy::default();
        let c = StoreContext {
            head: true,
            ..ctx(&req)
        };
        assert_eq!(storable(200, &resp, &c), Err(NotStored::Head));
    }

    #[test]
    fn declared_length_over_the_limit_is_too_large() {
        assert_eq!(
            store(
                200,
                &[("cache-control", "max-age=5"), ("content-length", "1001")]
            ),
            Err(NotStored::TooLarge)
        );
        assert!(store(
            200,
            &[("cache-control", "max-age=5"), ("content-length", "1000")]
        )
        .is_ok());
    }

    #[test]
    fn hop_by_hop_and_recomputed_fields_are_not_stored() {
        // RFC 9111 §3.1: Connection and the fields it names are not stored.
        let s = store(
            200,
            &[
                ("cache-control", "max-age=5"),
                ("connection", "x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("age", "3"),
                ("content-length", "10"),
                ("x-envoy-upstream-service-time", "2"),
                ("cache-status", "up; hit"),
                ("ETag", "\"a\""),
            ],
        )
        .unwrap();
        let names: Vec<&str> = s.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["cache-control", "etag"]);
    }

    #[test]
    fn no_cache_response_with_validator_is_kept_but_never_reused_unvalidated() {
        // RFC 9111 §5.2.2.4
        let s = store(200, &[("cache-control", "no-cache"), ("etag", "\"x\"")]).unwrap();
        assert!(s.meta.has(flags::REQUIRES_VALIDATION));
        assert_eq!(
            reuse(&s.meta, &RequestPolicy::default(), T),
            Reuse::Forward(Forward::Stale)
        );
        assert_eq!(
            store(200, &[("cache-control", "no-cache")]),
            Err(NotStored::NoFreshness)
        );
    }

    fn meta(lifetime: u32, initial_age: u32, f: u16) -> ResponseMeta {
        ResponseMeta {
            status: 200,
            flags: f,
            response_time: T,
            initial_age,
            lifetime,
        }
    }

    #[test]
    fn fresh_then_stale() {
        // RFC 9111 §4.2: fresh while freshness_lifetime > current_age.
        let m = meta(10, 2, 0);
        let req = RequestPolicy::default();
        assert_eq!(reuse(&m, &req, T), Reuse::Fresh { age: 2, ttl: 8 });
        assert_eq!(reuse(&m, &req, T + 7), Reuse::Fresh { age: 9, ttl: 1 });
        assert_eq!(reuse(&m, &req, T + 8), Reuse::Forward(Forward::Stale));
    }

    #[test]
    fn request_max_age_min_fresh_max_stale() {
        // RFC 9111 §5.2.1.1-3
        let m = meta(10, 0, 0);
        let rq = |cc: &str| RequestPolicy::from_request(&hdrs(&[("cache-control", cc)]));
        assert_eq!(
            reuse(&m, &rq("max-age=3"), T + 4),
            Reuse::Forward(Forward::Request)
        );
        assert!(matches!(
            reuse(&m, &rq("max-age=3"), T + 3),
            Reuse::Fresh { .. }
        ));
        assert_eq!(
            reuse(&m, &rq("min-fresh=5"), T + 6),
            Reuse::Forward(Forward::Request)
        );
        assert_eq!(
            reuse(&m, &rq("max-stale=5"), T + 15),
            Reuse::Fresh { age: 15, ttl: -5 }
        );
        assert_eq!(
            reuse(&m, &rq("max-stale=5"), T + 16),
            Reuse::Forward(Forward::Stale)
        );
        assert!(matches!(
            reuse(&m, &rq("max-stale"), T + 1000),
            Reuse::Fresh { .. }
        ));
        // §4.2.4: must-revalidate forbids serving stale even when the client allows it.
        let strict = meta(10, 0, flags::FORBIDS_STALE);
        assert_eq!(
            reuse(&strict, &rq("max-stale"), T + 11),
            Reuse::Forward(Forward::Stale)
        );
    }

    #[test]
    fn request_no_cache_and_pragma() {
        // RFC 9111 §5.2.1.4, §5.4
        let m = meta(10, 0, 0);
        let p = RequestPolicy::from_request(&hdrs(&[("pragma", "no-cache")]));
        assert_eq!(reuse(&m, &p, T), Reuse::Forward(Forward::Request));
        // Pragma is ignored when Cache-Control is present.
        let p = RequestPolicy::from_request(&hdrs(&[
            ("pragma", "no-cache"),
            ("cache-control", "max-stale=1"),
        ]));
        assert!(matches!(reuse(&m, &p, T), Reuse::Fresh { .. }));
        let p = RequestPolicy::from_request(&hdrs(&[("cache-control", "no-cache")]));
        assert_eq!(reuse(&m, &p, T), Reuse::Forward(Forward::Request));
    }
}
