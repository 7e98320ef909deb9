#!/usr/bin/env bash
# End-to-end check of the nginx module in the stock Debian /usr/sbin/nginx:
#   - `nginx -t` accepts a config that loads edge_filter.wasm and refuses a bad .wasm and a
#     configuration the filter refuses;
#   - GET /healthz is answered by the filter (200, application/health+json, "status":"pass");
#   - other paths still reach the upstream through proxy_pass.
# Starts nginx on 127.0.0.1 with a temporary prefix and stops it; every wait is bounded.
# Needs: ./prepare.sh, the module built (see README.md) and edge_filter.wasm built.
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
pid=""
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -QUIT "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port="$(free_port)"
origin_port="$(free_port)"

# render FILTER_LINE WASM_PATH > nginx.conf
render() {
    cat <<CONF
load_module $module;
pid $tmp/nginx.pid;
error_log $tmp/error.log info;
# One worker: shared data (the cache) is per worker until the shared-memory zone exists.
worker_processes 1;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $tmp/client_body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;

    proxy_wasm_module edge_filter $2;

    server {
        listen 127.0.0.1:$port;
        location / {
            $1
            proxy_pass http://127.0.0.1:$origin_port;
        }
    }
    # The upstream: a plain nginx server in the same instance.
    server {
        listen 127.0.0.1:$origin_port;
        location / { return 200 "origin\n"; }
        location /cacheable { add_header Cache-Control "max-age=60"; return 200 "cached body\n"; }
    }
}
CONF
}

fail() { echo "FAIL: $*" >&2; echo "--- error.log" >&2; tail -n 30 "$tmp/error.log" >&2 || true; exit 1; }
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

# 3. The real configuration is accepted and runs.
render "proxy_wasm edge_filter '{}';" "$wasm" > "$tmp/nginx.conf"
"$nginx" -t -p "$tmp" -c "$tmp/nginx.conf" 2>&1 | grep -q "test is successful" || fail "nginx -t refused the config"
pass "nginx -t accepts the config"
"$nginx" -p "$tmp" -c "$tmp/nginx.conf" -g 'daemon on; master_process on;'
for _ in $(seq 1 100); do [ -s "$tmp/nginx.pid" ] && break; sleep 0.1; done
pid="$(cat "$tmp/nginx.pid" 2>/dev/null || true)"
[ -n "$pid" ] || fail "nginx did not start"

# get PATH [METHOD] -> prints "status|content-type" and the body into $tmp/body
get() {
    curl -sS -m 10 -o "$tmp/body" -X "${2:-GET}" -w '%{http_code}|%{content_type}' \
        "http://127.0.0.1:$port$1"
}
up=""
for _ in $(seq 1 100); do
    if curl -s -m 1 -o /dev/null "http://127.0.0.1:$port/"; then up=1; break; fi
    sleep 0.1
done
[ -n "$up" ] || fail "nginx does not answer on port $port"

r="$(get /healthz)"
[ "$r" = "200|application/health+json" ] || fail "/healthz answered $r: $(cat "$tmp/body")"
grep -q '"status":"pass"' "$tmp/body" || fail "/healthz body: $(cat "$tmp/body")"
grep -q '"serviceId":"edge-filter"' "$tmp/body" || fail "/healthz body: $(cat "$tmp/body")"
pass "GET /healthz -> $r $(head -c 80 "$tmp/body")..."

for i in $(seq 1 20); do
    r="$(get "/healthz?i=$i")"
    [ "$r" = "200|application/health+json" ] || fail "/healthz #$i answered $r"
done
pass "20 more /healthz answered by the filter"

# Miss then hit: the response path (header and body filters) lets edge-filter add its
# Cache-Status and capture the body as it streams; the second request is its local reply.
hdr() { curl -sS -m 10 -D "$tmp/headers" -o "$tmp/body" -w '%{http_code}' "http://127.0.0.1:$port$1"; }
r="$(hdr /cacheable)"
cs="$(grep -i '^cache-status:' "$tmp/headers" | tr -d '\r')"
[ "$r" = 200 ] && [ "$(cat "$tmp/body")" = "cached body" ] || fail "miss answered $r: $(cat "$tmp/body")"
grep -q 'fwd=uri-miss.*stored' <<<"$cs" || fail "miss Cache-Status: '$cs'"
pass "GET /cacheable (miss) -> $r, $cs"
r="$(hdr /cacheable)"
cs="$(grep -i '^cache-status:' "$tmp/headers" | tr -d '\r')"
[ "$r" = 200 ] && [ "$(cat "$tmp/body")" = "cached body" ] || fail "hit answered $r: $(cat "$tmp/body")"
grep -q 'edge-filter; hit' <<<"$cs" || fail "hit Cache-Status: '$cs'"
grep -qi '^age: ' "$tmp/headers" || fail "hit without Age"
pass "GET /cacheable (hit) -> $r, $cs, served by the filter"

r="$(get /page)"
[ "${r%%|*}" = 200 ] && [ "$(cat "$tmp/body")" = origin ] || fail "/page answered $r: $(cat "$tmp/body")"
pass "GET /page -> proxied to the upstream ($r, body 'origin')"

! grep -E '\[(alert|emerg)\]|trapped|panic' "$tmp/error.log" || fail "errors in error.log"
pass "no alert, trap or panic in error.log"
echo "PASS"
