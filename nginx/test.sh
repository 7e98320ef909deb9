#!/usr/bin/env bash
# Checks of the module in the stock Debian /usr/sbin/nginx that the Rust end-to-end tests
# (tests/tests/scenarios_nginx.rs, nginx_ops.rs) do not make:
#   - `nginx -t` refuses a file that is not Wasm and a configuration the filter refuses,
#     each with a clear message;
#   - root contexts (an nginx in front of a Python origin): ticks with no traffic, /readyz
#     following the origin, an unknown cluster, a call timeout, a background refresh,
#     reload and quit not held up by timers or calls.
# Starts nginx on 127.0.0.1 with a temporary prefix and stops it; every wait is bounded.
# Needs the module built (see README.md) and edge_filter.wasm.
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
extra_pids=""   # helper processes (test origins) to stop on exit
cleanup() {
    for p in $extra_pids; do kill "$p" 2>/dev/null || true; done
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -QUIT "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
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


free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ---------------------------------------------------------------------------------------
# Root-context work in the workers (CLIENT): VMs made at worker start, ticks on nginx
# timers, dispatch_http_call to a named `upstream` block on the module's own client.
# A separate nginx instance, in front of a Python origin the test stops and restarts.
# ---------------------------------------------------------------------------------------

cport="$(free_port)"; cport_nocluster="$(free_port)"; cport_slow="$(free_port)"
oport="$(free_port)"
olog="$tmp/origin.log"; : > "$olog"
cat > "$tmp/origin.py" <<'PY'
# Test origin: logs each request line (and user-agent) to a file; /swr is cacheable for
# 2 s with stale-while-revalidate, its body counts the requests; /slow answers after 3 s.
import http.server, sys, time
port, log = int(sys.argv[1]), sys.argv[2]
count = {}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with open(log, "a") as f:
            f.write(f"GET {self.path} ua={self.headers.get('User-Agent', '')}\n")
        n = count[self.path] = count.get(self.path, 0) + 1
        headers = []
        if self.path.startswith("/slow"):
            time.sleep(3)
        if self.path.startswith("/swr"):
            body = f"swr v{n}\n".encode()
            headers.append(("Cache-Control", "max-age=2, stale-while-revalidate=30"))
        else:
            body = b"ok\n"
        try:
            self.send_response(200)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the caller gave up (the timeout case)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
origin_pid=""
start_origin() {
    python3 "$tmp/origin.py" "$oport" "$olog" 2>>"$tmp/origin.err" &
    origin_pid=$!
    extra_pids="$extra_pids $origin_pid"
    for _ in $(seq 1 50); do
        curl -s -m 1 -o /dev/null "http://127.0.0.1:$oport/up" && return 0
        sleep 0.1
    done
    fail "the test origin did not start on $oport"
}
stop_origin() {
    kill "$origin_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$origin_pid" 2>/dev/null || return 0; sleep 0.1; done
    fail "the test origin did not stop"
}

cat > "$tmp/client.conf" <<CONF
load_module $module;
pid $tmp/nginx.pid;
error_log $tmp/client-error.log info;
worker_processes 1;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $tmp/client_body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;

    # edge-filter's health.upstream_cluster defaults to "upstream": the name of this block.
    upstream upstream { server 127.0.0.1:$oport; }

    # One module name per filter below: each gets its own shared data (its readiness).
    proxy_wasm_module edge_filter $wasm;
    proxy_wasm_module ef_nocluster $wasm;
    proxy_wasm_module ef_slow $wasm;

    server {
        listen 127.0.0.1:$cport;
        location / {
            proxy_wasm edge_filter '{"health":{"check_period_ms":300,"check_timeout_ms":1000}}';
            proxy_pass http://upstream;
        }
    }
    server {
        listen 127.0.0.1:$cport_nocluster;
        location / {
            proxy_wasm ef_nocluster '{"health":{"upstream_cluster":"nope","check_period_ms":300}}';
            proxy_pass http://upstream;
        }
    }
    server {
        listen 127.0.0.1:$cport_slow;
        location / {
            proxy_wasm ef_slow '{"health":{"check_path":"/slow","check_timeout_ms":300,"check_period_ms":500}}';
            proxy_pass http://upstream;
        }
    }
}
CONF
cfail() { echo "FAIL: $*" >&2; echo "--- client-error.log" >&2; tail -n 30 "$tmp/client-error.log" >&2 || true; exit 1; }
# cget PORT PATH -> "status" with the body in $tmp/cbody and the headers in $tmp/cheaders
cget() { curl -sS -m 10 -D "$tmp/cheaders" -o "$tmp/cbody" -w '%{http_code}' "http://127.0.0.1:$1$2"; }
# wait_ready PORT WANT SECONDS: polls /readyz until it answers WANT, within SECONDS
wait_ready() {
    local r=""
    for _ in $(seq 1 $(($3 * 10))); do
        r="$(cget "$1" /readyz || true)"
        [ "$r" = "$2" ] && return 0
        sleep 0.1
    done
    cfail "/readyz on $1 answered $r, not $2, within $3 s: $(cat "$tmp/cbody" 2>/dev/null)"
}

start_origin
"$nginx" -t -p "$tmp" -c "$tmp/client.conf" 2>&1 | grep -q "test is successful" || cfail "nginx -t refused client.conf"
"$nginx" -p "$tmp" -c "$tmp/client.conf" -g 'daemon on; master_process on;'
for _ in $(seq 1 100); do [ -s "$tmp/nginx.pid" ] && break; sleep 0.1; done
pid="$(cat "$tmp/nginx.pid" 2>/dev/null || true)"
[ -n "$pid" ] || cfail "nginx (client.conf) did not start"

# The VM exists from worker start and its tick sends the readiness check: the origin sees
# it before any client request reaches nginx.
seen=""
for _ in $(seq 1 50); do
    grep -q '^GET / ua=edge-filter-readiness' "$olog" && { seen=1; break; }
    sleep 0.1
done
[ -n "$seen" ] || cfail "no readiness check reached the origin without client traffic: $(cat "$olog")"
pass "readiness check sent from a tick with no client traffic (origin saw it)"

wait_ready "$cport" 200 5
grep -q '"status":"pass"' "$tmp/cbody" || cfail "/readyz body: $(cat "$tmp/cbody")"
pass "/readyz passes while the origin is up"

stop_origin
wait_ready "$cport" 503 5
grep -q '"status":"fail"' "$tmp/cbody" || cfail "/readyz body: $(cat "$tmp/cbody")"
pass "/readyz fails (503) after the origin stopped: $(grep -o '"output":"[^"]*"' "$tmp/cbody")"
start_origin
wait_ready "$cport" 200 5
pass "/readyz passes again after the origin restarted"

# Unknown cluster: BadArgument (Envoy's answer), the filter reports it, nothing crashes.
wait_ready "$cport_nocluster" 503 5
grep -q 'cannot call cluster `nope`' "$tmp/cbody" || cfail "unknown-cluster /readyz: $(cat "$tmp/cbody")"
grep -q 'http_call to unknown cluster "nope"' "$tmp/client-error.log" || cfail "no warning for cluster nope"
pass "http_call to an unknown cluster: BadArgument, /readyz 503 ($(grep -o 'cannot call cluster[^"]*' "$tmp/cbody"))"

# A check slower than its timeout gets Envoy's 504 and the call is closed.
slow=""
for _ in $(seq 1 80); do
    r="$(cget "$cport_slow" /readyz || true)"
    [ "$r" = 503 ] && grep -q 'upstream answered 504' "$tmp/cbody" && { slow=1; break; }
    sleep 0.1
done
[ -n "$slow" ] || cfail "slow /readyz: $r $(cat "$tmp/cbody")"
grep -q 'http_call timed out after 300 ms' "$tmp/client-error.log" || cfail "no timeout logged"
pass "a call slower than its timeout: 504 (upstream request timeout), /readyz 503"

# Stale-while-revalidate: the stale entry is served and refreshed in the background by a
# call from the root context (woken by a 1 ms tick the request set).
r="$(cget "$cport" /swr)"
[ "$r" = 200 ] && [ "$(cat "$tmp/cbody")" = "swr v1" ] || cfail "/swr miss: $r $(cat "$tmp/cbody")"
grep -qi '^cache-status:.*stored' "$tmp/cheaders" || cfail "/swr not stored: $(cat "$tmp/cheaders")"
sleep 3   # max-age=2: stale now, within stale-while-revalidate=30
r="$(cget "$cport" /swr)"
cs="$(grep -i '^cache-status:' "$tmp/cheaders" | tr -d '\r')"
[ "$r" = 200 ] && [ "$(cat "$tmp/cbody")" = "swr v1" ] || cfail "/swr stale: $r $(cat "$tmp/cbody")"
grep -q 'detail=stale-while-revalidate' <<<"$cs" || cfail "/swr stale Cache-Status: '$cs'"
pass "stale /swr served at once: $cs"
refreshed=""
for _ in $(seq 1 50); do
    [ "$(grep -c '^GET /swr ' "$olog")" -ge 2 ] && { refreshed=1; break; }
    sleep 0.1
done
[ -n "$refreshed" ] || cfail "the origin never saw the background refresh: $(cat "$olog")"
pass "the origin saw the background refresh of /swr"
# The refreshed response was stored: the next request is a hit with the new body.
ok=""
for _ in $(seq 1 20); do
    r="$(cget "$cport" /swr)"
    if [ "$r" = 200 ] && [ "$(cat "$tmp/cbody")" = "swr v2" ]; then ok=1; break; fi
    sleep 0.1
done
[ -n "$ok" ] || cfail "refreshed /swr not served: $r $(cat "$tmp/cbody")"
grep -qi '^cache-status:.*hit' "$tmp/cheaders" || cfail "refreshed /swr not a hit: $(cat "$tmp/cheaders")"
[ "$(grep -c '^GET /swr ' "$olog")" -eq 2 ] || cfail "/swr reached the origin $(grep -c '^GET /swr ' "$olog") times"
pass "the refreshed /swr is stored and served as a hit (body 'swr v2')"

# Reload and quit are not held up by tick timers or calls in flight (cancelable timers).
workers() { pgrep -P "$pid" | sort | tr '\n' ' '; }
old_workers="$(workers)"
kill -HUP "$pid"
# The master compiles the modules again first (seconds); then the old workers must go.
for _ in $(seq 1 300); do [ "$(workers)" != "$old_workers" ] && break; sleep 0.1; done
[ "$(workers)" != "$old_workers" ] || cfail "no new worker 30 s after a reload"
gone=""
for _ in $(seq 1 50); do
    alive=""
    for w in $old_workers; do kill -0 "$w" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && { gone=1; break; }
    sleep 0.1
done
[ -n "$gone" ] || cfail "old workers ($old_workers) still running 5 s after a reload"
wait_ready "$cport" 200 5
pass "reload: old workers exited at once, the new worker's ticks pass /readyz"
kill -QUIT "$pid"
for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
! kill -0 "$pid" 2>/dev/null || cfail "nginx still running 5 s after QUIT"
pid=""
! grep -E '\[(alert|emerg)\]|trapped|panic|open socket' "$tmp/client-error.log" || cfail "errors in client-error.log"
pass "graceful quit within 5 s; no alert, trap, panic or open socket in client-error.log"
echo "PASS"
