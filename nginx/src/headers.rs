//! nginx's header lists as Proxy-Wasm header maps, and a filter's changes written back.

use ngx::ffi::{
    ngx_hash_key_lc, ngx_http_request_t, ngx_list_create, ngx_list_part_t, ngx_list_push,
    ngx_list_t, ngx_pnalloc, ngx_str_t, ngx_table_elt_t,
};
use proxy_wasm_harness::abi::Pairs;

/// Request headers nginx itself acts on for framing and routing: a filter's changes to
/// them are not applied (nginx already used them; changing them mid-request would desync
/// the connection).
const FRAMING_REQUEST_HEADERS: [&[u8]; 8] = [
    b"host",
    b"connection",
    b"content-length",
    b"transfer-encoding",
    b"expect",
    b"upgrade",
    b"te",
    b"keep-alive",
];

/// Calls `f` with each live entry of an nginx header list, in order.
unsafe fn for_each_entry(part: *const ngx_list_part_t, mut f: impl FnMut(&ngx_table_elt_t)) {
    let mut part = part;
    while !part.is_null() {
        let p = &*part;
        let elts = p.elts as *const ngx_table_elt_t;
        for i in 0..p.nelts {
            let h = &*elts.add(i);
            // Deleted entries have hash 0 (the ngx crate's iterator does not skip them).
            if h.hash != 0 {
                f(h);
            }
        }
        part = p.next;
    }
}

/// The entries of an nginx header list, names lower-cased, deleted entries skipped.
pub(crate) unsafe fn list_pairs(part: *const ngx_list_part_t, out: &mut Pairs) {
    for_each_entry(part, |h| {
        let key = std::slice::from_raw_parts(h.key.data, h.key.len).to_ascii_lowercase();
        out.push((key, h.value.as_bytes().to_vec()));
    });
}

/// What nginx parsed of a request's head, as received, for [`pseudo_headers`].
pub(crate) struct RequestHead<'a> {
    /// `r->request_line`: method, target and version as the client sent them.
    pub request_line: &'a [u8],
    /// `r->unparsed_uri`: what `proxy_pass` without a URI part forwards.
    pub unparsed_uri: &'a [u8],
    /// `r->method_name`.
    pub method: &'a [u8],
    /// The `Host` header's value as received, if there is one.
    pub host: Option<&'a [u8]>,
    /// The connection is TLS.
    pub tls: bool,
}

/// The request target of a request line: after the method and its spaces, up to the
/// next space or line end (nginx 1.22 refuses spaces in a target).
fn request_target(line: &[u8]) -> &[u8] {
    let after_method = line
        .iter()
        .position(|&b| b == b' ')
        .map_or(&[][..], |i| &line[i..]);
    let start = after_method
        .iter()
        .position(|&b| b != b' ')
        .unwrap_or(after_method.len());
    let target = &after_method[start..];
    let end = target
        .iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(target.len());
    &target[..end]
}

/// Envoy's pseudo-headers for a request, chosen so that the filter's cache key is what
/// the upstream receives:
/// - `:authority` is the raw `Host` header (what `proxy_set_header Host $http_host`
///   forwards), not nginx's parsed `headers_in.server`, which an absolute-form target
///   overrides (lower-cased, port stripped); empty without one (the filter bypasses).
/// - `:path` is `unparsed_uri` for an origin-form target. For an absolute-form one
///   (`GET http://a/x`) nginx's `unparsed_uri` is only `/x`, while the Host forwarded may
///   name another host: the filter gets the whole target, which it never keys (it keys
///   only paths that start with `/`). nginx's parser accepts no other form (`*` and
///   authority-form are 400s).
/// - `:scheme` is `https` on a TLS connection: a TLS and a plaintext listener sharing a
///   zone must not share entries (an http-to-https redirect served for https loops).
pub(crate) fn pseudo_headers(h: &RequestHead<'_>) -> Pairs {
    let target = request_target(h.request_line);
    let path = if target.is_empty() || target.starts_with(b"/") {
        h.unparsed_uri
    } else {
        target
    };
    let scheme: &[u8] = if h.tls { b"https" } else { b"http" };
    vec![
        (b":authority".to_vec(), h.host.unwrap_or_default().to_vec()),
        (b":path".to_vec(), path.to_vec()),
        (b":method".to_vec(), h.method.to_vec()),
        (b":scheme".to_vec(), scheme.to_vec()),
    ]
}

/// The request headers as Envoy gives them to a filter: pseudo-headers first.
pub(crate) unsafe fn request_pairs(r: &ngx_http_request_t) -> Pairs {
    let host = r.headers_in.host.as_ref().map(|h| h.value.as_bytes());
    let tls = r.connection.as_ref().is_some_and(|c| !c.ssl.is_null());
    let mut out = pseudo_headers(&RequestHead {
        request_line: r.request_line.as_bytes(),
        unparsed_uri: r.unparsed_uri.as_bytes(),
        method: r.method_name.as_bytes(),
        host,
        tls,
    });
    list_pairs(&r.headers_in.headers.part, &mut out);
    out
}

/// The response headers as Envoy gives them: `:status` first, then `content-type` and
/// `content-length` (nginx keeps those in fields of their own), then the list.
pub(crate) unsafe fn response_pairs(r: &ngx_http_request_t) -> Pairs {
    let mut out: Pairs = vec![(
        b":status".to_vec(),
        r.headers_out.status.to_string().into_bytes(),
    )];
    if r.headers_out.content_type.len > 0 {
        out.push((
            b"content-type".to_vec(),
            r.headers_out.content_type.as_bytes().to_vec(),
        ));
    }
    if r.headers_out.content_length_n >= 0 {
        out.push((
            b"content-length".to_vec(),
            r.headers_out.content_length_n.to_string().into_bytes(),
        ));
    }
    list_pairs(&r.headers_out.headers.part, &mut out);
    out
}

/// How many entries [`response_pairs`] gives, without copying them.
pub(crate) unsafe fn response_pair_count(r: &ngx_http_request_t) -> usize {
    let mut n = 1
        + usize::from(r.headers_out.content_type.len > 0)
        + usize::from(r.headers_out.content_length_n >= 0);
    for_each_entry(&r.headers_out.headers.part, |_| n += 1);
    n
}

/// [`response_pairs`] of the request at `r`, for a [`crate::host::HeadersSource`].
///
/// # Safety
/// `r` is a live `ngx_http_request_t`.
pub(crate) unsafe fn read_response_pairs(r: *const std::ffi::c_void) -> Pairs {
    response_pairs(&*(r as *const ngx_http_request_t))
}

/// A copy of `s` in the request's pool.
pub(crate) unsafe fn pool_str(r: *mut ngx_http_request_t, s: &[u8]) -> Option<ngx_str_t> {
    let p = ngx_pnalloc((*r).pool, s.len().max(1)) as *mut u8;
    if p.is_null() {
        return None;
    }
    std::ptr::copy_nonoverlapping(s.as_ptr(), p, s.len());
    Some(ngx_str_t {
        len: s.len(),
        data: p,
    })
}

fn values(p: &Pairs, k: &[u8]) -> Vec<Vec<u8>> {
    p.iter()
        .filter(|(n, _)| n == k)
        .map(|(_, v)| v.clone())
        .collect()
}

/// Marks every entry named `k` deleted (hash 0), as nginx's own filters do.
unsafe fn delete_all(list: *mut ngx_list_t, k: &[u8]) {
    let mut part: *mut ngx_list_part_t = &mut (*list).part;
    while !part.is_null() {
        let elts = (*part).elts as *mut ngx_table_elt_t;
        for i in 0..(*part).nelts {
            let h = &mut *elts.add(i);
            let key = std::slice::from_raw_parts(h.key.data, h.key.len);
            if h.hash != 0 && key.eq_ignore_ascii_case(k) {
                h.hash = 0;
            }
        }
        part = (*part).next;
    }
}

/// Deletes every response header (a local response in the response phase replaces them).
pub(crate) unsafe fn clear_response_headers(r: *mut ngx_http_request_t) {
    let mut part: *mut ngx_list_part_t = &mut (*r).headers_out.headers.part;
    while !part.is_null() {
        let elts = (*part).elts as *mut ngx_table_elt_t;
        for i in 0..(*part).nelts {
            (*elts.add(i)).hash = 0;
        }
        part = (*part).next;
    }
    let o = &mut (*r).headers_out;
    o.content_length = std::ptr::null_mut();
    o.content_length_n = -1;
    o.last_modified = std::ptr::null_mut();
    o.last_modified_time = -1;
    o.etag = std::ptr::null_mut();
    o.location = std::ptr::null_mut();
    o.content_type.len = 0;
    o.content_type_len = 0;
    o.charset.len = 0;
}

/// Sets `:status`; nginx's status line (kept from the upstream) would override it.
pub(crate) unsafe fn set_status(r: *mut ngx_http_request_t, status: u32) {
    (*r).headers_out.status = status as _;
    (*r).headers_out.status_line.len = 0;
}

/// Sets the content type; `None` removes it.
pub(crate) unsafe fn set_content_type(r: *mut ngx_http_request_t, ct: Option<&[u8]>) -> bool {
    let o = &mut (*r).headers_out;
    o.charset.len = 0;
    match ct {
        None => {
            o.content_type.len = 0;
            o.content_type_len = 0;
            true
        }
        Some(ct) => match pool_str(r, ct) {
            Some(s) => {
                let o = &mut (*r).headers_out;
                o.content_type = s;
                o.content_type_len = s.len;
                o.content_type_lowcase = std::ptr::null_mut();
                true
            }
            None => false,
        },
    }
}

/// Sets the content length; `None` removes it (the body is then chunked or closed).
pub(crate) unsafe fn set_content_length(r: *mut ngx_http_request_t, len: Option<i64>) {
    let o = &mut (*r).headers_out;
    if !o.content_length.is_null() {
        (*o.content_length).hash = 0;
        o.content_length = std::ptr::null_mut();
    }
    o.content_length_n = len.unwrap_or(-1);
}

/// Applies a filter's response header changes: every header whose values changed is
/// deleted and added again with its new values; `:status`, `content-type` and
/// `content-length` go to nginx's own fields.
pub(crate) unsafe fn apply_response_headers(
    r: *mut ngx_http_request_t,
    old: &Pairs,
    new: &Pairs,
) -> bool {
    let mut keys: Vec<&Vec<u8>> = old.iter().chain(new.iter()).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let new_values = values(new, k);
        if values(old, k) == new_values {
            continue;
        }
        match k.as_slice() {
            b":status" => {
                let s = new_values
                    .first()
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
                    .filter(|s| (100..1000).contains(s));
                if let Some(s) = s {
                    set_status(r, s);
                }
                continue;
            }
            b"content-type" => {
                if !set_content_type(r, new_values.first().map(Vec::as_slice)) {
                    return false;
                }
                continue;
            }
            b"content-length" => {
                let n = new_values
                    .first()
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok());
                set_content_length(r, n);
                continue;
            }
            _ if k.starts_with(b":") => continue,
            _ => {}
        }
        delete_all(&mut (*r).headers_out.headers, k);
        match k.as_slice() {
            b"last-modified" => {
                (*r).headers_out.last_modified = std::ptr::null_mut();
                (*r).headers_out.last_modified_time = -1;
            }
            b"etag" => (*r).headers_out.etag = std::ptr::null_mut(),
            b"location" => (*r).headers_out.location = std::ptr::null_mut(),
            _ => {}
        }
        for v in new_values {
            if !push_header(r, &mut (*r).headers_out.headers, k, &v) {
                return false;
            }
        }
    }
    true
}

/// Writes a filter's request headers back: the header list is rebuilt (the proxy module
/// forwards every list entry, deleted or not, so deleting in place would not remove a
/// header upstream) and the fields nginx keeps for conditional and content-negotiation
/// headers are pointed at the new entries. Framing headers and pseudo-headers keep their
/// original values. Returns the names of changes that were not applied.
pub(crate) unsafe fn apply_request_headers(
    r: *mut ngx_http_request_t,
    old: &Pairs,
    new: &Pairs,
) -> Result<Vec<String>, ()> {
    let mut ignored = Vec::new();
    let framing = |k: &[u8]| FRAMING_REQUEST_HEADERS.contains(&k);
    // A new query on the same path is forwarded (edge-filter's cache-key query policy:
    // what it keys is what goes upstream); any other `:path` change is reported.
    let (old_paths, new_paths) = (values(old, b":path"), values(new, b":path"));
    let new_query = match (old_paths.as_slice(), new_paths.as_slice()) {
        ([o], [n]) if o != n => query_change(o, n),
        _ => None,
    };
    if let Some(q) = new_query {
        let (Some(uri), Some(args)) = (pool_str(r, q.target), pool_str(r, q.args)) else {
            return Err(());
        };
        (*r).unparsed_uri = uri;
        (*r).set_valid_unparsed_uri(1);
        (*r).args = ngx_str_t {
            len: q.args.len(),
            data: args.data,
        };
    }
    for (k, _) in old.iter().chain(new.iter()) {
        if k == b":path" && new_query.is_some() {
            continue;
        }
        if (k.starts_with(b":") || framing(k)) && values(old, k) != values(new, k) {
            let name = String::from_utf8_lossy(k).into_owned();
            if !ignored.contains(&name) {
                ignored.push(name);
            }
        }
    }
    let n = new.len().max(1);
    let list = ngx_list_create((*r).pool, n as _, std::mem::size_of::<ngx_table_elt_t>());
    if list.is_null() {
        return Err(());
    }
    // Framing headers: the original entries, as they were.
    let mut part: *mut ngx_list_part_t = &mut (*r).headers_in.headers.part;
    while !part.is_null() {
        let elts = (*part).elts as *mut ngx_table_elt_t;
        for i in 0..(*part).nelts {
            let h = &*elts.add(i);
            let key = std::slice::from_raw_parts(h.key.data, h.key.len).to_ascii_lowercase();
            if h.hash != 0 && framing(&key) {
                let e = ngx_list_push(list) as *mut ngx_table_elt_t;
                if e.is_null() {
                    return Err(());
                }
                *e = *h;
            }
        }
        part = (*part).next;
    }
    for (k, v) in new {
        if k.starts_with(b":") || framing(k) {
            continue;
        }
        let e = ngx_list_push(list) as *mut ngx_table_elt_t;
        let (Some(key), Some(value), Some(low)) = (pool_str(r, k), pool_str(r, v), pool_str(r, k))
        else {
            return Err(());
        };
        if e.is_null() {
            return Err(());
        }
        *e = ngx_table_elt_t {
            hash: ngx_hash_key_lc(key.data, key.len).max(1),
            key,
            value,
            lowcase_key: low.data,
        };
    }
    (*r).headers_in.headers = *list;
    // The fields nginx reads these headers from (not_modified, range, gzip, variables).
    let first = move |name: &[u8]| -> *mut ngx_table_elt_t { first_in(r, name) };
    let hi = std::ptr::addr_of_mut!((*r).headers_in);
    let hi = &mut *hi;
    hi.if_modified_since = first(b"if-modified-since");
    hi.if_unmodified_since = first(b"if-unmodified-since");
    hi.if_match = first(b"if-match");
    hi.if_none_match = first(b"if-none-match");
    hi.range = first(b"range");
    hi.if_range = first(b"if-range");
    hi.user_agent = first(b"user-agent");
    hi.referer = first(b"referer");
    hi.accept_encoding = first(b"accept-encoding");
    hi.authorization = first(b"authorization");
    hi.via = first(b"via");
    hi.date = first(b"date");
    Ok(ignored)
}

/// A `:path` change that only replaces the query of an origin-form target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueryChange<'a> {
    /// The new target, path and query.
    pub target: &'a [u8],
    /// The new query without `?` (empty when there is none).
    pub args: &'a [u8],
}

/// The query-only change from `old` to `new`, if that is all it is: the part before `?`
/// is the same and starts with `/`, and the new target has no byte a request line cannot
/// carry.
pub(crate) fn query_change<'a>(old: &[u8], new: &'a [u8]) -> Option<QueryChange<'a>> {
    let split = |t: &'a [u8]| -> (&'a [u8], &'a [u8]) {
        match t.iter().position(|&b| b == b'?') {
            Some(i) => (
                t.get(..i).unwrap_or_default(),
                t.get(i + 1..).unwrap_or_default(),
            ),
            None => (t, &[][..]),
        }
    };
    let old_path = old.split(|&b| b == b'?').next().unwrap_or_default();
    let (new_path, args) = split(new);
    let visible = new.iter().all(|&b| (0x21..0x7f).contains(&b));
    (old_path == new_path && old_path.starts_with(b"/") && visible)
        .then_some(QueryChange { target: new, args })
}

/// The first request header entry named `name`.
unsafe fn first_in(r: *mut ngx_http_request_t, name: &[u8]) -> *mut ngx_table_elt_t {
    let mut part: *mut ngx_list_part_t = &mut (*r).headers_in.headers.part;
    while !part.is_null() {
        let elts = (*part).elts as *mut ngx_table_elt_t;
        for i in 0..(*part).nelts {
            let h = elts.add(i);
            let key = std::slice::from_raw_parts((*h).key.data, (*h).key.len);
            if key.eq_ignore_ascii_case(name) {
                return h;
            }
        }
        part = (*part).next;
    }
    std::ptr::null_mut()
}

/// Whether `k: v` can go on the wire as one header line. Any other byte is passed
/// (obs-text included: RFC 9110 §5.5 allows it, and the proxies forward it).
fn header_line_ok(k: &[u8], v: &[u8]) -> bool {
    !k.is_empty() && !k.iter().chain(v).any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// Adds `k: v`, bytes as given (copies in the request's pool, the name lower-cased for
/// lookups), to an nginx header list; false when out of memory. A pair that would
/// break the header line (CR, LF, NUL, an empty name) is left out.
pub(crate) unsafe fn push_header(
    r: *mut ngx_http_request_t,
    list: *mut ngx_list_t,
    k: &[u8],
    v: &[u8],
) -> bool {
    if !header_line_ok(k, v) {
        return true;
    }
    let (Some(key), Some(value), Some(low)) = (
        pool_str(r, k),
        pool_str(r, v),
        pool_str(r, &k.to_ascii_lowercase()),
    ) else {
        return false;
    };
    let e = ngx_list_push(list) as *mut ngx_table_elt_t;
    if e.is_null() {
        return false;
    }
    *e = ngx_table_elt_t {
        hash: ngx_hash_key_lc(key.data, key.len).max(1),
        key,
        value,
        lowcase_key: low.data,
    };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head<'a>(line: &'a [u8], unparsed: &'a [u8], host: Option<&'a [u8]>) -> RequestHead<'a> {
        RequestHead {
            request_line: line,
            unparsed_uri: unparsed,
            method: b"GET",
            host,
            tls: false,
        }
    }

    fn get<'a>(p: &'a Pairs, k: &[u8]) -> &'a [u8] {
        &p.iter().find(|(n, _)| n == k).expect("pseudo-header").1
    }

    #[test]
    fn origin_form_keys_the_raw_host_and_the_unparsed_uri() {
        let p = pseudo_headers(&head(
            b"GET /a%2Fb/../c?q=1 HTTP/1.1",
            b"/a%2Fb/../c?q=1",
            Some(b"Example.TEST:8080"),
        ));
        assert_eq!(
            p.iter().map(|(k, _)| k.as_slice()).collect::<Vec<_>>(),
            [&b":authority"[..], b":path", b":method", b":scheme"]
        );
        // Bytes as received: no case folding, the port kept.
        assert_eq!(get(&p, b":authority"), b"Example.TEST:8080");
        assert_eq!(get(&p, b":path"), b"/a%2Fb/../c?q=1");
        assert_eq!(get(&p, b":method"), b"GET");
        assert_eq!(get(&p, b":scheme"), b"http");
    }

    #[test]
    fn no_host_header_gives_an_empty_authority() {
        let p = pseudo_headers(&head(b"GET /k HTTP/1.0", b"/k", None));
        assert_eq!(get(&p, b":authority"), b"");
    }

    #[test]
    fn obs_text_in_host_passes_unchanged() {
        let p = pseudo_headers(&head(b"GET /k HTTP/1.1", b"/k", Some(b"a\xff.test")));
        assert_eq!(get(&p, b":authority"), b"a\xff.test");
    }

    #[test]
    fn absolute_form_gives_the_whole_target_never_a_path() {
        // nginx's unparsed_uri is only the path part; Host names another host.
        let cases: [(&[u8], &[u8], &[u8]); 5] = [
            (b"GET http://a.test/k HTTP/1.1", b"/k", b"http://a.test/k"),
            (
                b"GET  HTTP://A.test:81/k?x=1 HTTP/1.1",
                b"/k?x=1",
                b"HTTP://A.test:81/k?x=1",
            ),
            // No path: nginx points unparsed_uri at a "/" inside "://".
            (b"GET http://a.test HTTP/1.1", b"/", b"http://a.test"),
            (b"GET http://a.test?x HTTP/1.1", b"?x", b"http://a.test?x"),
            // HTTP/0.9 has no version.
            (b"GET http://a.test/k", b"/k", b"http://a.test/k"),
        ];
        for (line, unparsed, want) in cases {
            let p = pseudo_headers(&head(line, unparsed, Some(b"b.test")));
            assert_eq!(get(&p, b":path"), want, "{}", String::from_utf8_lossy(line));
            assert!(!get(&p, b":path").starts_with(b"/"));
            assert_eq!(get(&p, b":authority"), b"b.test");
        }
    }

    #[test]
    fn only_query_changes_of_origin_form_targets_apply() {
        let q = query_change(b"/p?utm_source=x&id=1", b"/p?id=1").expect("query change");
        assert_eq!((q.target, q.args), (&b"/p?id=1"[..], &b"id=1"[..]));
        let q = query_change(b"/p?utm=1", b"/p").expect("query removed");
        assert_eq!((q.target, q.args), (&b"/p"[..], &b""[..]));
        assert_eq!(query_change(b"/p", b"/q"), None, "another path");
        assert_eq!(query_change(b"/p?a", b"/q?a"), None);
        assert_eq!(query_change(b"http://h/p?a", b"http://h/p"), None);
        assert_eq!(
            query_change(b"/p?a", b"/p?a b"),
            None,
            "not a request-line byte"
        );
        assert_eq!(query_change(b"/p?a", b"/p?\xff"), None);
    }

    #[test]
    fn request_line_edges() {
        assert_eq!(request_target(b"GET /k HTTP/1.1\r\n"), b"/k");
        assert_eq!(request_target(b"GET /k\r\n"), b"/k");
        assert_eq!(request_target(b"GET"), b"");
        assert_eq!(request_target(b""), b"");
        // A request line nginx did not give: the unparsed URI is used.
        let p = pseudo_headers(&head(b"", b"/k", Some(b"a")));
        assert_eq!(get(&p, b":path"), b"/k");
    }

    #[test]
    fn header_lines_keep_obs_text_and_refuse_line_breaks() {
        assert!(header_line_ok(
            b"content-disposition",
            b"filename=\"r\xe9sum\xe9.pdf\""
        ));
        assert!(header_line_ok(b"etag", b"\"e\xfc1\""));
        assert!(header_line_ok(b"x", b""));
        assert!(!header_line_ok(b"", b"v"));
        assert!(!header_line_ok(b"x", b"a\r\nset-cookie: b"));
        assert!(!header_line_ok(b"x", b"a\nb"));
        assert!(!header_line_ok(b"x\r", b"v"));
        assert!(!header_line_ok(b"x", b"a\0b"));
    }

    #[test]
    fn tls_connections_say_https() {
        let mut h = head(b"GET /k HTTP/1.1", b"/k", Some(b"a"));
        h.tls = true;
        assert_eq!(get(&pseudo_headers(&h), b":scheme"), b"https");
    }
}
