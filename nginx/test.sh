#!/usr/bin/env bash
# `nginx -t` checks of the module in the stock Debian /usr/sbin/nginx that the Rust
# end-to-end tests do not make: it refuses a file that is not Wasm and a configuration the
# filter refuses, each with a clear message. Everything else (the shipped
# nginx/conf/nginx.conf running edge-filter: health, cache, metrics, failure policy,
# reload, workers sharing the cache) is tests/tests/scenarios_nginx.rs and nginx_ops.rs.
# Runs nothing that listens; needs the module built (see README.md) and edge_filter.wasm.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
module="${NGX_PROXY_WASM_MODULE:-$here/target/release/libngx_proxy_wasm.so}"
wasm="${EDGE_FILTER_WASM:-$root/target/wasm32-wasip1/release/edge_filter.wasm}"
nginx=/usr/sbin/nginx
for f in "$module" "$wasm" "$nginx"; do
    [ -f "$f" ] || { echo "test.sh: missing $f" >&2; exit 2; }
done

tmp="$(mktemp -d /tmp/ngx-proxy-wasm-test.XXXXXX)"
cleanup() {
    if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

# render FILTER_LINE WASM_PATH > nginx.conf (`nginx -t` binds no port)
render() {
    cat <<CONF
load_module $module;
pid $tmp/nginx.pid;
error_log $tmp/error.log info;
events {}
http {
    access_log off;
    client_body_temp_path $tmp/client_body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;

    proxy_wasm_module edge_filter $2;

    server {
        listen 127.0.0.1:10000;
        location / {
            $1
            proxy_pass http://127.0.0.1:8080;
        }
    }
}
CONF
}

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok: $*"; }

# 1. nginx -t refuses a file that is not Wasm, with a clear message.
printf 'not wasm' > "$tmp/bad.wasm"
render "proxy_wasm edge_filter '{}';" "$tmp/bad.wasm" > "$tmp/bad-wasm.conf"
if out="$("$nginx" -t -p "$tmp" -c "$tmp/bad-wasm.conf" 2>&1)"; then
    fail "nginx -t accepted a bad .wasm"
fi
grep -q "invalid Wasm module" <<<"$out" || fail "unclear message for a bad .wasm: $out"
pass "nginx -t refuses a bad .wasm: $(grep -o 'invalid Wasm module[^:]*' <<<"$out" | head -1)"

# 2. nginx -t refuses a configuration the filter refuses.
render "proxy_wasm edge_filter '{\"cache\": 42}';" "$wasm" > "$tmp/bad-config.conf"
if out="$("$nginx" -t -p "$tmp" -c "$tmp/bad-config.conf" 2>&1)"; then
    fail "nginx -t accepted a configuration edge-filter refuses"
fi
grep -q "refused its configuration" <<<"$out" || fail "unclear message for a bad config: $out"
pass "nginx -t refuses a bad filter config"

# 3. The same configuration with a valid filter config is accepted (so 1 and 2 failed for
#    the reasons they name, not for something else in the file).
render "proxy_wasm edge_filter '{}';" "$wasm" > "$tmp/good.conf"
out="$("$nginx" -t -p "$tmp" -c "$tmp/good.conf" 2>&1)" || fail "nginx -t refused a good config: $out"
pass "nginx -t accepts the same config with a valid filter config"

echo "PASS"
