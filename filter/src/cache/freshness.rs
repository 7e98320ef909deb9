//! Freshness lifetime (RFC 9111 §4.2.1) and age (§4.2.3). Times are Unix seconds.

use super::cache_control::{CacheControl, Delta};
use std::time::{Duration, UNIX_EPOCH};

/// Parses an HTTP-date (RFC 9110 §5.6.7, all three formats) into Unix seconds.
pub fn parse_http_date(s: impl AsRef<[u8]>) -> Option<u64> {
    // A date is ASCII; any other byte makes it invalid.
    let s = std::str::from_utf8(s.as_ref()).ok()?;
    let t = httpdate::parse_http_date(s.trim()).ok()?;
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// Formats Unix seconds as an IMF-fixdate.
pub fn format_http_date(secs: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Where the freshness lifetime came from; also a log and `Cache-Status` detail label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifetimeSource {
    /// `s-maxage`.
    SMaxAge,
    /// `max-age`.
    MaxAge,
    /// `Expires` minus `Date`.
    Expires,
}

/// RFC 9111 §4.2.1: the explicit freshness lifetime of a response, in seconds, or `None` when
/// the response has no explicit freshness. Invalid values give a lifetime of 0 (stale).
///
/// `expires` and `date` are all field lines of those headers; `response_time` stands in for a
/// missing or invalid `Date` (RFC 9110 §6.6.1 lets a recipient add it on receipt).
pub fn freshness_lifetime<E: AsRef<[u8]>, D: AsRef<[u8]>>(
    cc: &CacheControl,
    expires: &[E],
    date: &[D],
    response_time: u64,
) -> Option<(u64, LifetimeSource)> {
    // A shared cache uses s-maxage first, then max-age, then Expires - Date.
    for (d, src) in [
        (cc.s_maxage, LifetimeSource::SMaxAge),
        (cc.max_age, LifetimeSource::MaxAge),
    ] {
        match d {
            Delta::Seconds(s) => return Some((u64::from(s), src)),
            Delta::Invalid => return Some((0, src)),
            Delta::Absent => {}
        }
    }
    match expires {
        [] => None,
        // §5.3: several Expires lines, or an invalid date (notably "0"), mean "already expired".
        [one] => match parse_http_date(one) {
            Some(exp) => {
                let date = single_date(date).unwrap_or(response_time);
                Some((exp.saturating_sub(date), LifetimeSource::Expires))
            }
            None => Some((0, LifetimeSource::Expires)),
        },
        _ => Some((0, LifetimeSource::Expires)),
    }
}

/// The `Date` value when there is exactly one valid line.
pub fn single_date<D: AsRef<[u8]>>(date: &[D]) -> Option<u64> {
    match date {
        [one] => parse_http_date(one),
        _ => None,
    }
}

/// The `Age` value (RFC 9111 §5.1): non-negative integer; invalid values are ignored, several
/// lines use the first valid one.
pub fn age_value<A: AsRef<[u8]>>(age: &[A]) -> u64 {
    age.iter()
        .find_map(|a| {
            let a = std::str::from_utf8(a.as_ref()).ok()?.trim();
            if a.is_empty() || !a.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // §1.2.2: overflow saturates at 2^31.
            Some(a.parse::<u64>().unwrap_or(1 << 31).min(1 << 31))
        })
        .unwrap_or(0)
}

/// RFC 9111 §4.2.3, computed once when the response arrives:
/// `corrected_initial_age = max(apparent_age, age_value + response_delay)`.
pub fn corrected_initial_age(
    date: Option<u64>,
    age_value: u64,
    request_time: u64,
    response_time: u64,
) -> u64 {
    let apparent_age = date.map_or(0, |d| response_time.saturating_sub(d));
    let response_delay = response_time.saturating_sub(request_time);
    apparent_age.max(age_value.saturating_add(response_delay))
}

/// RFC 9111 §4.2.3: `current_age = corrected_initial_age + resident_time`.
pub fn current_age(corrected_initial_age: u64, response_time: u64, now: u64) -> u64 {
    corrected_initial_age.saturating_add(now.saturating_sub(response_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000;

    fn cc(s: &str) -> CacheControl {
        CacheControl::parse([s])
    }

    #[test]
    fn s_maxage_before_max_age_before_expires() {
        // RFC 9111 §4.2.1: first match wins in this order for a shared cache.
        let exp = format_http_date(T + 500);
        let date = format_http_date(T);
        let l = |c: &str| freshness_lifetime(&cc(c), &[&exp], &[&date], T);
        assert_eq!(
            l("s-maxage=10, max-age=20"),
            Some((10, LifetimeSource::SMaxAge))
        );
        assert_eq!(l("max-age=20"), Some((20, LifetimeSource::MaxAge)));
        assert_eq!(l(""), Some((500, LifetimeSource::Expires)));
    }

    #[test]
    fn expires_uses_date_or_response_time() {
        // RFC 9111 §4.2.1: freshness_lifetime = Expires - Date.
        let exp = format_http_date(T + 100);
        let date = format_http_date(T - 50);
        assert_eq!(
            freshness_lifetime(&cc(""), &[&exp], &[&date], T),
            Some((150, LifetimeSource::Expires))
        );
        assert_eq!(
            freshness_lifetime(&cc(""), &[&exp], &[] as &[&str], T),
            Some((100, LifetimeSource::Expires))
        );
    }

    #[test]
    fn invalid_expires_means_expired() {
        // RFC 9111 §5.3: invalid dates, especially "0", are in the past.
        assert_eq!(
            freshness_lifetime(&cc(""), &["0"], &[] as &[&str], T),
            Some((0, LifetimeSource::Expires))
        );
        let e = format_http_date(T + 9);
        assert_eq!(
            freshness_lifetime(&cc(""), &[&e, &e], &[] as &[&str], T).map(|l| l.0),
            Some(0)
        );
    }

    #[test]
    fn expires_in_the_past_gives_zero_not_underflow() {
        let exp = format_http_date(T - 100);
        assert_eq!(
            freshness_lifetime(&cc(""), &[&exp], &[] as &[&str], T).map(|l| l.0),
            Some(0)
        );
    }

    #[test]
    fn invalid_max_age_is_stale() {
        // RFC 9111 §4.2.1: conflicting or invalid directives may be considered stale.
        assert_eq!(
            freshness_lifetime(&cc("max-age=x"), &[] as &[&str], &[] as &[&str], T).map(|l| l.0),
            Some(0)
        );
    }

    #[test]
    fn no_explicit_freshness() {
        assert_eq!(
            freshness_lifetime(&cc("public"), &[] as &[&str], &[] as &[&str], T),
            None
        );
    }

    #[test]
    fn all_three_date_formats_parse() {
        // RFC 9110 §5.6.7: IMF-fixdate, rfc850-date and asctime-date.
        let imf = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(imf, Some(784111777));
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), imf);
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), imf);
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn corrected_initial_age_takes_the_larger_estimate() {
        // RFC 9111 §4.2.3: apparent_age vs age_value + response_delay.
        // Origin clock 30 s behind: apparent age 30 beats Age 5 + delay 2.
        assert_eq!(corrected_initial_age(Some(T - 30), 5, T - 2, T), 30);
        // Upstream Age dominates.
        assert_eq!(corrected_initial_age(Some(T), 100, T - 2, T), 102);
        // Date in the future: apparent age 0.
        assert_eq!(corrected_initial_age(Some(T + 60), 0, T, T), 0);
        assert_eq!(corrected_initial_age(None, 0, T - 1, T), 1);
    }

    #[test]
    fn current_age_adds_resident_time() {
        // RFC 9111 §4.2.3
        assert_eq!(current_age(10, T, T + 5), 15);
        assert_eq!(current_age(10, T, T - 5), 10); // clock went backwards: no negative age
    }

    #[test]
    fn age_header_values() {
        // RFC 9111 §5.1: Age is delta-seconds; invalid values are ignored.
        assert_eq!(age_value(&["10"]), 10);
        assert_eq!(age_value(&["x", "7"]), 7);
        assert_eq!(age_value(&["-3"]), 0);
        assert_eq!(age_value(&["999999999999999999999"]), 1 << 31);
    }
}
