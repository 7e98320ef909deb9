//! Cache decisions: may a request use the cache (RFC 9111 §4), may a response be stored (§3),
//! and may a stored response answer a request (§4.2, §5.2.1).

use super::cache_control::CacheControl;
use super::entry::{flags, ResponseMeta, ResponseView};
use super::freshness;
use super::vary::Vary;

use crate::field::{has, text, values, Field, OwnedFields};

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
    pub fn from_request<F: Field>(req: &[F]) -> RequestPolicy {
        let cc_lines = values(req, "cache-control");
        let cc = CacheControl::parse(cc_lines.iter().copied());
        // §5.4: Pragma: no-cache counts only when Cache-Control is absent.
        let pragma_no_cache = cc_lines.is_empty()
            && values(req, "pragma")
                .iter()
                .flat_map(|v| v.split(|&b| b == b','))
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"no-cache"));
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
    /// The header fields to store (lower-case names), byte for byte.
    pub headers: OwnedFields,
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
    /// Fraction of `Date - Last-Modified` used as heuristic freshness (RFC 9111 §4.2.2).
    pub heuristic_fraction: f64,
    /// Cap on heuristic freshness, seconds.
    pub heuristic_max_secs: u64,
    /// Targeted cache-control fields this cache obeys, in order (RFC 9213 §2.2).
    pub targets: &'a [String],
    /// The operator's key parts, as implicit Vary names (`cache.key_headers`, `_cookies`).
    pub implicit_vary: &'a [String],
}

/// The directives that decide a response's caching here (RFC 9213 §2.2): the first targeted
/// field with a valid, non-empty value, else `Cache-Control`. The flag says which.
pub fn response_cache_control<F: Field>(resp: &[F], targets: &[String]) -> (CacheControl, bool) {
    match super::targeted::directives(resp, targets) {
        Some(cc) => (cc, true),
        None => (CacheControl::parse(values(resp, "cache-control")), false),
    }
}

/// RFC 9110 §15.1: statuses cacheable by default, for which heuristic freshness may be used.
pub const HEURISTICALLY_CACHEABLE: [u16; 12] =
    [200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];

/// RFC 9111 §3: may this response be stored? `resp` excludes pseudo-headers.
pub fn storable<F: Field>(
    status: u16,
    resp: &[F],
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
    let (cc, targeted) = response_cache_control(resp, ctx.targets);
    // §5.2.2.3: with must-understand, a cache that understands the status ignores no-store;
    // every status it may store is one it understands.
    if cc.no_store && !cc.must_understand {
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
    let vary = Vary::parse(values(resp, "vary")).with_implicit(ctx.implicit_vary);
    if matches!(vary, Vary::Star | Vary::Unusable) {
        return Err(NotStored::VaryStar);
    }
    let date_lines = values(resp, "date");
    // RFC 9213 §2.2: a targeted field replaces Expires too.
    let expires = if targeted {
        Vec::new()
    } else {
        values(resp, "expires")
    };
    let lifetime = freshness::freshness_lifetime(&cc, &expires, &date_lines, ctx.response_time);
    let has_validator = has(resp, "etag") || has(resp, "last-modified");
    let lifetime = match lifetime {
        Some((l, _)) => l,
        None => match heuristic_lifetime(status, &cc, resp, &date_lines, ctx) {
            Some(l) => l,
            // Nothing to go on, but a validator: stored stale, revalidated on every use.
            None if has_validator && heuristic_allowed(status, &cc) => 0,
            None if cc.requires_validation() && has_validator => 0,
            None => return Err(NotStored::NoFreshness),
        },
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

/// RFC 9111 §4.2.2: heuristics only for statuses cacheable by default or responses marked
/// `public`.
fn heuristic_allowed(status: u16, cc: &CacheControl) -> bool {
    HEURISTICALLY_CACHEABLE.contains(&status) || cc.public
}

/// RFC 9111 §4.2.2: a fraction of the time since `Last-Modified`, capped; `None` without a
/// usable `Last-Modified`.
fn heuristic_lifetime<F: Field>(
    status: u16,
    cc: &CacheControl,
    resp: &[F],
    date_lines: &[&[u8]],
    ctx: &StoreContext<'_>,
) -> Option<u64> {
    if !heuristic_allowed(status, cc) || ctx.heuristic_fraction <= 0.0 {
        return None;
    }
    let [lm] = values(resp, "last-modified")[..] else {
        return None;
    };
    let lm = freshness::parse_http_date(lm)?;
    let date = freshness::single_date(date_lines).unwrap_or(ctx.response_time);
    let age = date.checked_sub(lm)?;
    Some(((age as f64 * ctx.heuristic_fraction) as u64).min(ctx.heuristic_max_secs))
}

/// Why a stale response may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// RFC 5861 §3 `stale-while-revalidate`.
    WhileRevalidate,
    /// RFC 5861 §4 `stale-if-error`, or the operator's grace.
    IfError,
}

impl StaleReason {
    /// `Cache-Status` `detail` and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            StaleReason::WhileRevalidate => "stale-while-revalidate",
            StaleReason::IfError => "stale-if-error",
        }
    }
}

/// May a stale stored response be served for `reason`? Returns its (negative) ttl.
///
/// RFC 9111 §4.2.4: never when `must-revalidate`, `proxy-revalidate`, `s-maxage` or
/// unqualified `no-cache` forbid it. RFC 5861: within the directive's window, taken from the
/// response (`stored_cc`) or, for errors, also from the request; `grace_secs` is the
/// operator's window for upstream failure (0: off).
pub fn stale_allowed(
    stored: &ResponseMeta,
    stored_cc: &CacheControl,
    req: &RequestPolicy,
    now: u64,
    reason: StaleReason,
    grace_secs: u64,
) -> Option<i64> {
    if stored.has(flags::FORBIDS_STALE) || stored.has(flags::REQUIRES_VALIDATION) {
        return None;
    }
    let age = freshness::current_age(u64::from(stored.initial_age), stored.response_time, now);
    let ttl = i64::from(stored.lifetime) - age as i64;
    let staleness = u64::try_from(-ttl).unwrap_or(0);
    let window = match reason {
        StaleReason::WhileRevalidate => {
            // A client that asked for validation or a bounded age does not get stale.
            if req.no_cache || req.cc.max_age.is_present() || req.cc.min_fresh.is_present() {
                return None;
            }
            u64::from(stored_cc.stale_while_revalidate.seconds().unwrap_or(0))
        }
        StaleReason::IfError => {
            let resp = stored_cc.stale_if_error.seconds().unwrap_or(0);
            let request = req.cc.stale_if_error.seconds().unwrap_or(0);
            u64::from(resp.max(request)).max(grace_secs)
        }
    };
    (staleness <= window && window > 0).then_some(ttl)
}

/// RFC 9111 §3.2 and §4.3.4: the stored header fields updated from a 304 (or a HEAD
/// response): each field the new response has replaces the stored one, except fields that
/// are not stored at all and `Content-Length`.
pub fn freshen<S: Field, N: Field>(stored: &[S], new: &[N]) -> OwnedFields {
    let incoming = stored_headers(new, &[]);
    let mut out: OwnedFields = stored
        .iter()
        .filter(|f| !incoming.iter().any(|(m, _)| m.as_slice() == f.name()))
        .map(|f| (f.name().to_vec(), f.value().to_vec()))
        .collect();
    out.extend(incoming);
    out
}

/// Methods that are safe (RFC 9110 §9.2.1) and so never invalidate.
pub fn is_safe_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE")
}

/// RFC 9111 §4.4: after a non-error response to an unsafe method, the target URI and the
/// same-origin `Location` and `Content-Location` URIs are invalidated. `request` is the
/// target's key; returns the keys to remove.
pub fn invalidation_targets<F: Field>(
    method: &str,
    status: u16,
    request: &super::key::CacheKey,
    resp: &[F],
) -> Vec<super::key::CacheKey> {
    use super::key::CacheKey;
    if is_safe_method(method) || !(200..400).contains(&status) {
        return Vec::new();
    }
    let mut out = vec![request.clone()];
    let base = request.as_str();
    let Some((scheme, rest)) = base.split_once("://") else {
        return out;
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    for name in ["location", "content-location"] {
        for v in values(resp, name) {
            // A URI is ASCII; anything else names no entry of ours.
            let Ok(v) = std::str::from_utf8(v) else {
                continue;
            };
            let v = v.trim();
            let (s, a, p) = if let Some((vs, vr)) = v.split_once("://") {
                let (va, vp) = vr.split_at(vr.find('/').unwrap_or(vr.len()));
                (vs.to_string(), va.to_string(), vp.to_string())
            } else if let Some(vr) = v.strip_prefix("//") {
                let (va, vp) = vr.split_at(vr.find('/').unwrap_or(vr.len()));
                (scheme.to_string(), va.to_string(), vp.to_string())
            } else if v.starts_with('/') {
                (scheme.to_string(), authority.to_string(), v.to_string())
            } else {
                // A relative reference merges with the base path (RFC 3986 §5.2.3).
                let no_query = path.split('?').next().unwrap_or("");
                let dir = no_query.rsplit_once('/').map_or("", |(d, _)| d);
                let dir = format!("{dir}/");
                (
                    scheme.to_string(),
                    authority.to_string(),
                    format!("{dir}{v}"),
                )
            };
            // `http://h` names the path `/` (RFC 9110 §4.2.3).
            let p = if p.is_empty() { "/".to_string() } else { p };
            if let Ok(k) = CacheKey::new(&s, &a, &p) {
                // Same origin only: another origin's entries are not this response's to drop.
                let origin = |k: &'_ str| -> Option<(String, String)> {
                    let (s, rest) = k.split_once("://")?;
                    let a = rest.split('/').next()?;
                    Some((s.to_string(), a.to_string()))
                };
                let same = match (origin(k.as_str()), origin(base)) {
                    (Some(x), Some(y)) => x == y,
                    _ => false,
                };
                if same && !out.contains(&k) {
                    out.push(k);
                }
            }
        }
    }
    out
}

/// The declared body length, when there is exactly one valid `Content-Length`.
pub fn content_length<F: Field>(resp: &[F]) -> Option<u64> {
    match values(resp, "content-length").as_slice() {
        [one] => {
            let v = one.trim_ascii();
            // RFC 9110 §8.6: 1*DIGIT, nothing else (no sign, no spaces inside).
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return None;
            }
            text(v).parse().ok()
        }
        _ => None,
    }
}

/// Fields never stored: hop-by-hop (RFC 9110 §7.6.1, RFC 9111 §3.1), values the cache
/// recomputes (`age`, `content-length`, `cache-status`), and the proxy's own per-request
/// fields.
fn is_unstored(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
            | b"upgrade"
            | b"proxy-authenticate"
            | b"proxy-authentication-info"
            | b"age"
            | b"content-length"
            | b"cache-status"
    ) || name.starts_with(b":")
        || name.starts_with(b"x-envoy-")
}

/// The header fields to keep, in order, lower-cased; skips those named by `Connection`
/// (§3.1) and the `withheld` qualified private/no-cache fields (§5.2.2.4, §5.2.2.7).
pub fn stored_headers<F: Field>(resp: &[F], withheld: &[&str]) -> OwnedFields {
    let connection: Vec<Vec<u8>> = values(resp, "connection")
        .iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .collect();
    resp.iter()
        .filter_map(|f| {
            let n = f.name().to_ascii_lowercase();
            let drop = is_unstored(&n)
                || connection.contains(&n)
                || withheld.iter().any(|w| w.as_bytes() == n.as_slice());
            (!drop).then(|| (n, f.value().to_vec()))
        })
        .collect()
}

/// A stored response's headers as served, for building a local reply: the stored fields,
/// then `Age` (RFC 9111 §5.1, always sent on a hit).
pub fn hit_headers<'a>(r: &ResponseView<'a>, age: &'a str) -> Vec<(&'a [u8], &'a [u8])> {
    let mut h = Vec::with_capacity(r.headers.len() + 2);
    h.extend(r.headers.iter().copied());
    h.push((b"age", age.as_bytes()));
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
            heuristic_fraction: 0.1,
            heuristic_max_secs: 86_400,
            targets: &[],
            implicit_vary: &[],
        }
    }

    fn store(status: u16, list: &[(&str, &str)]) -> Result<Storable, NotStored> {
        let req = RequestPolicy::default();
        storable(status, &hdrs(list), &ctx(&req))
    }

    fn store_targeted(list: &[(&str, &str)]) -> Result<Storable, NotStored> {
        let req = RequestPolicy::default();
        let targets = [
            "edge-cache-control".to_string(),
            "cdn-cache-control".to_string(),
        ];
        let c = StoreContext {
            targets: &targets,
            ..ctx(&req)
        };
        storable(200, &hdrs(list), &c)
    }

    #[test]
    fn a_targeted_field_replaces_cache_control_and_expires() {
        // RFC 9213 §2.2: the targeted field decides; Cache-Control and Expires are ignored,
        // no-store, private and s-maxage included.
        let later = freshness::format_http_date(T + 500);
        for cc in ["no-store", "private", "s-maxage=5", "max-age=0"] {
            let s = store_targeted(&[
                ("cache-control", cc),
                ("expires", &later),
                ("cdn-cache-control", "max-age=60"),
            ])
            .unwrap_or_else(|e| panic!("{cc}: {e:?}"));
            assert_eq!(s.meta.lifetime, 60, "{cc}");
            assert!(!s.meta.has(flags::FORBIDS_STALE), "{cc}");
        }
        // And its own no-store, private and s-maxage apply.
        assert_eq!(
            store_targeted(&[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store")
            ])
            .unwrap_err(),
            NotStored::NoStore
        );
        assert_eq!(
            store_targeted(&[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "private")
            ])
            .unwrap_err(),
            NotStored::Private
        );
        let s = store_targeted(&[("cdn-cache-control", "s-maxage=30, max-age=5")]).unwrap();
        assert_eq!(s.meta.lifetime, 30);
        assert!(s.meta.has(flags::FORBIDS_STALE) && s.meta.has(flags::AUTH_OK));
        // The first listed valid target wins; an invalid one is skipped; the field is stored.
        let s = store_targeted(&[
            ("cdn-cache-control", "max-age=60"),
            ("edge-cache-control", "max-age=7"),
        ])
        .unwrap();
        assert_eq!(s.meta.lifetime, 7);
        assert!(s.headers.iter().any(|(n, _)| n == b"cdn-cache-control"));
        let s = store_targeted(&[
            ("cache-control", "max-age=9"),
            ("cdn-cache-control", "max-age=60,"),
        ])
        .unwrap();
        assert_eq!(s.meta.lifetime, 9, "an invalid targeted field is ignored");
        // Without targets configured, CDN-Cache-Control means nothing here.
        let s = store(
            200,
            &[
                ("cache-control", "max-age=9"),
                ("cdn-cache-control", "max-age=60"),
            ],
        );
        assert_eq!(s.unwrap().meta.lifetime, 9);
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
        assert!(s.headers.iter().all(|(n, _)| n != b"set-cookie"));
        assert!(s.headers.iter().any(|(n, _)| n == b"x"));
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
        let names: Vec<&[u8]> = s.headers.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(names, [&b"cache-control"[..], b"etag"]);
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

    #[test]
    fn must_understand_overrides_no_store_for_understood_statuses() {
        // RFC 9111 §5.2.2.3
        assert!(store(
            200,
            &[("cache-control", "must-understand, no-store, max-age=5")]
        )
        .is_ok());
        assert_eq!(
            store(
                500,
                &[("cache-control", "must-understand, no-store, max-age=5")]
            ),
            Err(NotStored::Status)
        );
    }

    #[test]
    fn heuristic_freshness_is_a_capped_fraction_of_the_age() {
        // RFC 9111 §4.2.2: 10% of (Date - Last-Modified), capped.
        let date = freshness::format_http_date(T);
        let lm = freshness::format_http_date(T - 1000);
        let s = store(200, &[("date", &date), ("last-modified", &lm)]).unwrap();
        assert_eq!(s.meta.lifetime, 100);
        let old = freshness::format_http_date(T - 100_000_000);
        let s = store(200, &[("date", &date), ("last-modified", &old)]).unwrap();
        assert_eq!(s.meta.lifetime, 86_400);
        // Not for statuses that are not cacheable by default, unless public.
        let req = RequestPolicy::default();
        let c = StoreContext {
            statuses: &[200, 302],
            ..ctx(&req)
        };
        let r = storable(302, &hdrs(&[("date", &date), ("last-modified", &lm)]), &c);
        assert_eq!(r, Err(NotStored::NoFreshness));
        let public = hdrs(&[
            ("date", &date),
            ("last-modified", &lm),
            ("cache-control", "public"),
        ]);
        assert_eq!(storable(302, &public, &c).unwrap().meta.lifetime, 100);
        // Explicit freshness always wins (§4.2.2: MUST NOT use heuristics then).
        let explicit = [
            ("date", date.as_str()),
            ("last-modified", &lm),
            ("cache-control", "max-age=7"),
        ];
        assert_eq!(store(200, &explicit).unwrap().meta.lifetime, 7);
    }

    #[test]
    fn etag_only_response_is_stored_for_revalidation() {
        let s = store(200, &[("etag", "\"a\"")]).unwrap();
        assert_eq!(s.meta.lifetime, 0);
        let r = reuse(&s.meta, &RequestPolicy::default(), T + 1);
        assert_eq!(r, Reuse::Forward(Forward::Stale));
    }

    #[test]
    fn stale_while_revalidate_window_and_prohibitions() {
        // RFC 5861 §3; RFC 9111 §4.2.4.
        let m = meta(10, 0, 0);
        let cc = CacheControl::parse(["max-age=10, stale-while-revalidate=5"]);
        let req = RequestPolicy::default();
        let swr = StaleReason::WhileRevalidate;
        assert_eq!(stale_allowed(&m, &cc, &req, T + 12, swr, 0), Some(-2));
        assert_eq!(stale_allowed(&m, &cc, &req, T + 15, swr, 0), Some(-5));
        assert_eq!(stale_allowed(&m, &cc, &req, T + 16, swr, 0), None);
        let strict = meta(10, 0, flags::FORBIDS_STALE);
        assert_eq!(stale_allowed(&strict, &cc, &req, T + 12, swr, 0), None);
        let no_cache = RequestPolicy::from_request(&hdrs(&[("cache-control", "no-cache")]));
        assert_eq!(stale_allowed(&m, &cc, &no_cache, T + 12, swr, 0), None);
        // Without the directive there is no window.
        let none = CacheControl::default();
        assert_eq!(stale_allowed(&m, &none, &req, T + 12, swr, 0), None);
    }

    #[test]
    fn stale_if_error_from_response_request_or_grace() {
        // RFC 5861 §4
        let m = meta(10, 0, 0);
        let none = CacheControl::default();
        let sie = StaleReason::IfError;
        let req = RequestPolicy::default();
        let resp = CacheControl::parse(["stale-if-error=30"]);
        assert_eq!(stale_allowed(&m, &resp, &req, T + 40, sie, 0), Some(-30));
        assert_eq!(stale_allowed(&m, &resp, &req, T + 41, sie, 0), None);
        let rq = RequestPolicy::from_request(&hdrs(&[("cache-control", "stale-if-error=100")]));
        assert_eq!(stale_allowed(&m, &none, &rq, T + 50, sie, 0), Some(-40));
        assert_eq!(stale_allowed(&m, &none, &req, T + 50, sie, 60), Some(-40));
        assert_eq!(stale_allowed(&m, &none, &req, T + 50, sie, 0), None);
        // must-revalidate wins over every window (RFC 9111 §5.2.2.2).
        let strict = meta(10, 0, flags::FORBIDS_STALE);
        assert_eq!(stale_allowed(&strict, &none, &rq, T + 50, sie, 600), None);
    }

    #[test]
    fn freshening_replaces_fields_but_not_content_length() {
        // RFC 9111 §3.2
        let stored = [
            ("etag", "\"a\""),
            ("cache-control", "max-age=1"),
            ("x-old", "1"),
            ("content-type", "text/plain"),
        ];
        let new = hdrs(&[
            ("cache-control", "max-age=60"),
            ("content-length", "0"),
            ("x-new", "2"),
            ("connection", "close"),
        ]);
        let out = freshen(&stored, &new);
        let get = |n: &str| {
            out.iter()
                .filter(|(k, _)| k == n.as_bytes())
                .map(|(_, v)| std::str::from_utf8(v).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("cache-control"), ["max-age=60"]);
        assert_eq!(get("x-old"), ["1"]);
        assert_eq!(get("x-new"), ["2"]);
        assert!(get("content-length").is_empty() && get("connection").is_empty());
        assert_eq!(get("etag"), ["\"a\""]);
    }

    #[test]
    fn unsafe_methods_invalidate_target_and_same_origin_locations() {
        // RFC 9111 §4.4
        use crate::cache::key::CacheKey;
        let k = CacheKey::new("http", "h", "/a/b?x=1").unwrap();
        let names = |h: &[(&str, &str)], m: &str, s: u16| -> Vec<String> {
            invalidation_targets(m, s, &k, &hdrs(h))
                .iter()
                .map(|k| k.to_string())
                .collect()
        };
        let resp = [("location", "/c"), ("content-location", "d")];
        assert_eq!(
            names(&resp, "POST", 201),
            ["http://h/a/b?x=1", "http://h/c", "http://h/a/d"]
        );
        let other = [
            ("location", "http://other.example/c"),
            ("content-location", "//h/e"),
        ];
        assert_eq!(
            names(&other, "DELETE", 204),
            ["http://h/a/b?x=1", "http://h/e"],
            "other origins are left alone"
        );
        // Errors and safe methods invalidate nothing; unknown methods are unsafe.
        assert!(names(&resp, "POST", 500).is_empty());
        assert!(names(&resp, "GET", 200).is_empty());
        assert_eq!(names(&[], "FROB", 200).len(), 1);
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
