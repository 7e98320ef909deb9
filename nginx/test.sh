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

# 4. proxy_wasm_call_location: a URI that is not a path is refused, naming it; the
#    documented call location (its proxy_pass reads the module's variables) is accepted.
render "proxy_wasm edge_filter '{}'; proxy_wasm_call_location call;" "$wasm" > "$tmp/bad-call.conf"
if out="$("$nginx" -t -p "$tmp" -c "$tmp/bad-call.conf" 2>&1)"; then
    fail "nginx -t accepted proxy_wasm_call_location call"
fi
grep -q 'invalid proxy_wasm_call_location "call"' <<<"$out" || fail "unclear message for a bad call location: $out"
# (The location's closing brace and render's own proxy_pass land in a spare location.)
render "proxy_wasm edge_filter '{}'; proxy_wasm_call_location /_proxy_wasm_call;
            proxy_pass http://127.0.0.1:8080;
        }
        location /_proxy_wasm_call {
            internal;
            proxy_pass http://\$proxy_wasm_call_cluster\$proxy_wasm_call_path;
            proxy_set_header Host \$proxy_wasm_call_authority;
            proxy_set_header X-Method \$proxy_wasm_call_method;
        }
        location /spare {" "$wasm" > "$tmp/call.conf"
out="$("$nginx" -t -p "$tmp" -c "$tmp/call.conf" 2>&1)" || fail "nginx -t refused the call location: $out"
pass "nginx -t refuses a bad proxy_wasm_call_location and accepts the documented location"


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
            proxy_wasm edge_filter '{"health":{"check_period_ms":300,"check_timeout_ms":1000,"upstream_failure":"fail"}}';
            proxy_pass http://upstream;
        }
    }
    server {
        listen 127.0.0.1:$cport_nocluster;
        location / {
            proxy_wasm ef_nocluster '{"health":{"upstream_cluster":"nope","check_period_ms":300,"upstream_failure":"fail"}}';
            proxy_pass http://upstream;
        }
    }
    server {
        listen 127.0.0.1:$cport_slow;
        location / {
            proxy_wasm ef_slow '{"health":{"check_path":"/slow","check_timeout_ms":300,"check_period_ms":500,"upstream_failure":"fail"}}';
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
# ---------------------------------------------------------------------------------------
# Shared-memory zones (proxy_wasm_shm_kv, proxy_wasm_shm_metrics, proxy_wasm_metrics):
# 4 workers share one cache and one set of metrics, and both survive `nginx -s reload`.
# A separate nginx instance under $tmp/shm, with its own ports; stopped at the end.
shm_dir="$tmp/shm"
mkdir -p "$shm_dir"
shm_port="$(free_port)"
shm_metrics_port="$(free_port)"
shm_origin_port="$(free_port)"
shm_pid=""
trap 'if [ -n "$shm_pid" ]; then kill -QUIT "$shm_pid" 2>/dev/null || true; fi; cleanup' EXIT
head -c 450000 /dev/zero | tr '\0' 'b' > "$shm_dir/big.txt"
# Workers run as another user (nobody): they must be able to read it.
chmod 755 "$tmp" "$shm_dir" && chmod 644 "$shm_dir/big.txt"
# shm_render [EXTRA_HTTP_LINE] > conf
shm_render() {
    cat <<CONF
load_module $module;
pid $shm_dir/nginx.pid;
error_log $shm_dir/error.log info;
worker_processes 4;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $shm_dir/client_body;
    proxy_temp_path $shm_dir/proxy;
    fastcgi_temp_path $shm_dir/fastcgi;
    uwsgi_temp_path $shm_dir/uwsgi;
    scgi_temp_path $shm_dir/scgi;
    ${1:-}
    proxy_wasm_module edge_filter $wasm;
    server {
        # reuseport: the kernel spreads fresh connections over the workers.
        listen 127.0.0.1:$shm_port reuseport;
        add_header X-Worker \$pid always;
        location / {
            proxy_wasm edge_filter '{}';
            proxy_pass http://127.0.0.1:$shm_origin_port;
        }
    }
    # Metrics on their own listener, without the filter (as Envoy's admin port).
    server {
        listen 127.0.0.1:$shm_metrics_port;
        location = /metrics { proxy_wasm_metrics; }
    }
    server {
        listen 127.0.0.1:$shm_origin_port;
        location /shared { add_header Cache-Control "max-age=300"; return 200 "shared body\n"; }
        location /big { add_header Cache-Control "max-age=300"; alias $shm_dir/big.txt; }
    }
}
CONF
}
shm_fail() { echo "FAIL: $*" >&2; echo "--- shm error.log" >&2; tail -n 30 "$shm_dir/error.log" >&2 || true; exit 1; }
# shm_get PATH -> "status|worker pid|cache-status", body in $shm_dir/body (a fresh connection)
shm_get() {
    local code
    code="$(curl -sS -m 10 -D "$shm_dir/headers" -o "$shm_dir/body" -w '%{http_code}' "http://127.0.0.1:$shm_port$1")"
    printf '%s|%s|%s\n' "$code" \
        "$(grep -i '^x-worker:' "$shm_dir/headers" | tr -d '\r' | cut -d' ' -f2)" \
        "$(grep -i '^cache-status:' "$shm_dir/headers" | tr -d '\r' | cut -d' ' -f2-)"
}
shm_workers() { ps -o pid= --ppid "$shm_pid" 2>/dev/null | tr -d ' ' | sort; }
# shm_metric SERIES -> its value on /metrics (empty if absent)
shm_metric() {
    curl -sS -m 10 "http://127.0.0.1:$shm_metrics_port/metrics" \
        | awk -v s="$1" 'index($0, s" ") == 1 { print $2 }'
}
shm_hit_series='edge_filter_requests_total{cache_result="hit",status_class="2xx"}'
shm_miss_series='edge_filter_requests_total{cache_result="miss",status_class="2xx"}'
# shm_wait_metric SERIES VALUE: the counter is bumped when nginx frees the request, which
# can be just after curl has the response; wait (bounded) for it.
shm_wait_metric() {
    local v=""
    for _ in $(seq 1 50); do
        v="$(shm_metric "$1")"
        [ "$v" = "$2" ] && return 0
        sleep 0.1
    done
    shm_fail "$1 is '$v' on /metrics, expected $2"
}

# Bad zone sizes are refused by nginx -t, naming the directive.
shm_render "proxy_wasm_shm_kv 10k;" > "$shm_dir/bad.conf"
out="$("$nginx" -t -p "$shm_dir" -c "$shm_dir/bad.conf" 2>&1)" && shm_fail "nginx -t accepted a 10k zone"
grep -q 'proxy_wasm_shm_kv: size "10k" is too small, the least is 256k' <<<"$out" || shm_fail "unclear: $out"
too_small="$(grep -o 'proxy_wasm_shm_kv: size.*256k' <<<"$out")"
shm_render "proxy_wasm_shm_metrics lots;" > "$shm_dir/bad.conf"
out="$("$nginx" -t -p "$shm_dir" -c "$shm_dir/bad.conf" 2>&1)" && shm_fail "nginx -t accepted 'lots'"
grep -q 'proxy_wasm_shm_metrics: invalid size "lots"' <<<"$out" || shm_fail "unclear: $out"
pass "shm: nginx -t refuses bad zone sizes ($too_small)"

shm_render > "$shm_dir/nginx.conf"
"$nginx" -t -p "$shm_dir" -c "$shm_dir/nginx.conf" 2>&1 | grep -q "test is successful" \
    || shm_fail "nginx -t refused the shared-memory config"
"$nginx" -p "$shm_dir" -c "$shm_dir/nginx.conf" -g 'daemon on; master_process on;'
for _ in $(seq 1 100); do [ -s "$shm_dir/nginx.pid" ] && break; sleep 0.1; done
shm_pid="$(cat "$shm_dir/nginx.pid" 2>/dev/null || true)"
[ -n "$shm_pid" ] || shm_fail "nginx (4 workers) did not start"
for _ in $(seq 1 100); do [ "$(shm_workers | wc -l)" = 4 ] && break; sleep 0.1; done
[ "$(shm_workers | wc -l)" = 4 ] || shm_fail "not 4 workers: $(shm_workers | tr '\n' ' ')"

# One worker stores the response ...
IFS='|' read -r code stored_by cs <<<"$(shm_get /shared)"
[ "$code" = 200 ] && grep -q 'stored' <<<"$cs" || shm_fail "miss answered $code, Cache-Status '$cs'"
pass "shm: GET /shared stored by worker $stored_by ($cs)"
# ... and another one answers it from the shared zone: fresh connections until a
# different worker answers (bounded); every answer must be a hit.
hits=0
other=""
declare -A hit_workers=()
for _ in $(seq 1 200); do
    IFS='|' read -r code by cs <<<"$(shm_get /shared)"
    [ "$code" = 200 ] && [ "$(cat "$shm_dir/body")" = "shared body" ] \
        || shm_fail "worker $by answered $code: $(cat "$shm_dir/body")"
    grep -q 'edge-filter; hit' <<<"$cs" || shm_fail "worker $by: not a hit: '$cs'"
    hits=$((hits + 1))
    hit_workers[$by]=1
    if [ "$by" != "$stored_by" ]; then other="$by"; [ "${#hit_workers[@]}" -ge 2 ] && break; fi
done
[ -n "$other" ] || shm_fail "200 fresh connections all went to worker $stored_by"
# Hits on two workers at least: a per-worker counter would then show less than the total.
[ "${#hit_workers[@]}" -ge 2 ] || shm_fail "hits came from one worker only: ${!hit_workers[*]}"
pass "shm: worker $other answered a hit for what worker $stored_by stored ($hits hits from ${#hit_workers[@]} workers)"

# Metrics: one counter for all workers, whichever worker serves /metrics.
shm_wait_metric "$shm_hit_series" "$hits"
shm_wait_metric "$shm_miss_series" 1
curl -sS -m 10 -D "$shm_dir/mheaders" -o "$shm_dir/metrics.txt" "http://127.0.0.1:$shm_metrics_port/metrics"
grep -qi '^content-type: text/plain; version=0.0.4' "$shm_dir/mheaders" \
    || shm_fail "/metrics Content-Type: $(grep -i '^content-type' "$shm_dir/mheaders")"
grep -q '^# TYPE edge_filter_upstream_response_time_milliseconds histogram$' "$shm_dir/metrics.txt" \
    && grep -q '^edge_filter_upstream_response_time_milliseconds_bucket{le="30000"} 1$' "$shm_dir/metrics.txt" \
    || shm_fail "/metrics: no upstream response time histogram with envoy.yaml's buckets"
pass "shm: /metrics shows $shm_hit_series $hits (hits of ${#hit_workers[@]} workers summed), misses 1"
if command -v promtool >/dev/null; then
    # Exit 3 is lint only; the lints allowed are the filter's own unit naming and the
    # missing `_total` of the module's envoy_wasm_*_vm_reload_* counters (Envoy's names;
    # its /stats/prometheus gets the same), not a format error.
    rc=0; lint="$(promtool check metrics < "$shm_dir/metrics.txt" 2>&1)" || rc=$?
    if [ "$rc" != 0 ] && { [ "$rc" != 3 ] || grep -v -e 'use base unit "seconds"' \
        -e '^envoy_wasm_[a-zA-Z0-9_]*_vm_reload_[a-z]* counter metrics should have "_total" suffix$' \
        <<<"$lint" | grep -q .; }; then
        shm_fail "promtool check metrics (exit $rc): $lint"
    fi
    pass "shm: promtool check metrics accepts /metrics (lint: $(grep -c 'base unit' <<<"$lint") unit-name notes)"
else
    echo "skip: promtool not installed; /metrics not checked by it"
fi

# Reload with the same zone sizes: new workers, same zones, so still a hit.
old_workers="$(shm_workers)"
"$nginx" -p "$shm_dir" -c "$shm_dir/nginx.conf" -s reload
new=""
for _ in $(seq 1 100); do
    now="$(shm_workers)"
    if [ "$(wc -l <<<"$now")" = 4 ] && [ -z "$(comm -12 <(echo "$old_workers") <(echo "$now"))" ]; then
        new="$now"; break
    fi
    sleep 0.1
done
[ -n "$new" ] || shm_fail "no 4 new workers after reload: $(shm_workers | tr '\n' ' ')"
IFS='|' read -r code by cs <<<"$(shm_get /shared)"
[ "$code" = 200 ] && grep -q 'edge-filter; hit' <<<"$cs" || shm_fail "after reload: $code '$cs'"
grep -qx "$by" <<<"$new" || shm_fail "after reload the hit came from $by, not a new worker"
grep -q 'zone "proxy_wasm_shm_kv" reused' "$shm_dir/error.log" || shm_fail "no reuse notice"
shm_wait_metric "$shm_hit_series" "$((hits + 1))"
pass "shm: after nginx -s reload, new worker $by answers a hit ($cs); hit counter $((hits + 1))"

# A zone too small for a response: the write fails, the filter is told (a failed write,
# not a trap), the response is intact, and the operator gets a warning naming the zone.
# (A new size is a new zone: the cache starts empty.)
shm_render "proxy_wasm_shm_kv 512k;" > "$shm_dir/nginx.conf"
"$nginx" -t -p "$shm_dir" -c "$shm_dir/nginx.conf" 2>&1 | grep -q "test is successful" \
    || shm_fail "nginx -t refused proxy_wasm_shm_kv 512k"
old_workers="$(shm_workers)"
"$nginx" -p "$shm_dir" -c "$shm_dir/nginx.conf" -s reload
for _ in $(seq 1 100); do
    now="$(shm_workers)"
    [ "$(wc -l <<<"$now")" = 4 ] && [ -z "$(comm -12 <(echo "$old_workers") <(echo "$now"))" ] && break
    sleep 0.1
done
IFS='|' read -r code by cs <<<"$(shm_get /shared)"
[ "$code" = 200 ] && grep -q 'fwd=uri-miss' <<<"$cs" || shm_fail "new zone size, expected a miss: $code '$cs'"
for _ in 1 2; do
    IFS='|' read -r code by cs <<<"$(shm_get /big)"
    [ "$code" = 200 ] && cmp -s "$shm_dir/body" "$shm_dir/big.txt" || shm_fail "/big answered $code"
    grep -q 'edge-filter; hit' <<<"$cs" && shm_fail "/big was stored in a 512k zone"
done
warning=""
for _ in $(seq 1 50); do
    warning="$(grep -o 'zone "proxy_wasm_shm_kv" (512k) is full.*raise proxy_wasm_shm_kv' "$shm_dir/error.log" | head -1)"
    [ -n "$warning" ] && break
    sleep 0.1
done
[ -n "$warning" ] || shm_fail "no 'zone full' warning"
[ "$(grep -c 'proxy_wasm_shm_kv" (512k) is full' "$shm_dir/error.log")" = 1 ] \
    || shm_fail "the 'zone full' warning is not rate-limited"
pass "shm: a 450 kB response in a 512k zone is served and not stored; warning: ...$(cut -c1-60 <<<"$warning")..."

! grep -E '\[(alert|emerg|crit)\]|trapped|panic' "$shm_dir/error.log" || shm_fail "errors in the shm error.log"
kill -QUIT "$shm_pid"
for _ in $(seq 1 50); do kill -0 "$shm_pid" 2>/dev/null || break; sleep 0.1; done
shm_pid=""
trap cleanup EXIT
# --------------------------------------------------------------- end of shared-memory zones

echo "PASS"
