#!/usr/bin/env bash
# Load run: edge-filter hits in nginx vs nginx's own proxy_cache hits vs nginx serving the
# file directly, in one nginx (one worker, pinned to CPU 0) with wrk pinned to CPU 1, 1 KiB
# bodies, on loopback. Prints a markdown table (req/s, p50, p99) and the worker's RSS.
#
#   ./nginx/bench.sh [DURATION_S] [CONNECTIONS] [PAIRS]
#
# With PAIRS, it then loads edge-filter and proxy_cache alternately PAIRS times each and
# prints the medians: on a noisy VM, interleaved runs compare the two better than one each.
#
# Needs the module and edge_filter.wasm built (see README.md); installs wrk if missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
duration="${1:-10}"
conns="${2:-32}"
pairs="${3:-0}"
module="${NGX_PROXY_WASM_MODULE:-$here/target/release/libngx_proxy_wasm.so}"
wasm="${EDGE_FILTER_WASM:-$root/target/wasm32-wasip1/release/edge_filter.wasm}"
# The harness's no-op Proxy-Wasm filter (Rust SDK): the module's own cost per request.
noop="$root/target/wasm32-wasip1/release/noop_filter.wasm"
[ -f "$noop" ] || (cd "$root" && cargo build --release --target wasm32-wasip1 -p proxy-wasm-harness-noop)
for f in "$module" "$wasm" "$noop"; do
    [ -f "$f" ] || { echo "bench.sh: missing $f" >&2; exit 2; }
done
command -v wrk >/dev/null || sudo_apt=1
if [ -n "${sudo_apt:-}" ]; then
    apt-get install -y --no-install-recommends wrk >/dev/null
fi
[ "$(nproc)" -ge 2 ] || { echo "bench.sh: needs 2 CPUs (nginx on one, wrk on the other)" >&2; exit 2; }

tmp="$(mktemp -d /tmp/ngx-bench.XXXXXX)"
pid=""
cleanup() {
    [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
p_filter="$(free_port)"; p_cache="$(free_port)"; p_file="$(free_port)"; p_origin="$(free_port)"
p_return="$(free_port)"
mkdir -p "$tmp/www" "$tmp/cache"
# Workers run as an unprivileged user when started as root: let them read the files.
chmod 755 "$tmp" "$tmp/www"
head -c 1024 /dev/urandom | base64 -w0 | head -c 1024 > "$tmp/www/obj"
obj_body="$(cat "$tmp/www/obj")"   # base64: safe inside an nginx string
chmod 644 "$tmp/www/obj"

cat > "$tmp/nginx.conf" <<CONF
load_module $module;
pid $tmp/nginx.pid;
error_log $tmp/error.log warn;
worker_processes 1;
worker_cpu_affinity 01;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $tmp/cb; proxy_temp_path $tmp/proxy; fastcgi_temp_path $tmp/f;
    uwsgi_temp_path $tmp/u; scgi_temp_path $tmp/s;
    proxy_cache_path $tmp/cache keys_zone=bench:10m;
    proxy_wasm_module edge_filter $wasm;
    proxy_wasm_module noop $noop;
    upstream origin { server 127.0.0.1:$p_origin; keepalive 16; }
    # edge-filter: hits are local replies from the rewrite phase.
    server {
        listen 127.0.0.1:$p_filter;
        location / {
            proxy_wasm edge_filter '{}';
            proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_pass http://origin;
        }
    }
    # nginx's own cache, same origin.
    server {
        listen 127.0.0.1:$p_cache;
        location / {
            proxy_cache bench; proxy_cache_valid 200 10m;
            proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_pass http://origin;
        }
    }
    # The file itself (the floor: no cache logic at all).
    server {
        listen 127.0.0.1:$p_file;
        location / { root $tmp/www; }
    }
    # The module's floor: nginx answering from its rewrite phase (return), without and
    # with the no-op Proxy-Wasm filter (its 7 callbacks per request, no work in them).
    server {
        listen 127.0.0.1:$p_return;
        location /return { return 200 "$obj_body"; }
        location /noop { proxy_wasm noop; return 200 "$obj_body"; }
    }
    # The origin: the same file with a freshness lifetime.
    server {
        listen 127.0.0.1:$p_origin;
        location / { root $tmp/www; add_header Cache-Control "max-age=600"; }
    }
}
CONF
/usr/sbin/nginx -p "$tmp" -c "$tmp/nginx.conf" -g 'daemon on; master_process on;'
for _ in $(seq 1 100); do [ -s "$tmp/nginx.pid" ] && break; sleep 0.1; done
pid="$(cat "$tmp/nginx.pid")"
for port in "$p_filter" "$p_cache" "$p_file"; do
    for _ in $(seq 1 100); do curl -s -m 1 -o /dev/null "http://127.0.0.1:$port/obj" && break; sleep 0.1; done
    # Warm: the second request is a hit for both caches.
    curl -s -o /dev/null "http://127.0.0.1:$port/obj"
done
hit="$(curl -s -D - -o /dev/null "http://127.0.0.1:$p_filter/obj" | tr -d '\r' | grep -i '^cache-status' || true)"
case "$hit" in *"; hit"*) ;; *) echo "bench.sh: edge-filter did not hit: '$hit'" >&2; exit 1 ;; esac

run() { # name port [path]
    local out rps p50 p99
    out="$(taskset -c 1 wrk -t1 -c"$conns" -d"${duration}s" --latency "http://127.0.0.1:$2${3:-/obj}")"
    rps="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
    p50="$(awk '$1=="50%" {print $2}' <<<"$out")"
    p99="$(awk '$1=="99%" {print $2}' <<<"$out")"
    errs="$(grep -E 'Non-2xx|Socket errors' <<<"$out" || true)"
    printf '| %s | %s | %s | %s |%s\n' "$1" "$rps" "$p50" "$p99" "${errs:+ $errs}"
}
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), nginx $(/usr/sbin/nginx -v 2>&1 | cut -d/ -f2)"
echo "command: ./nginx/bench.sh $duration $conns $pairs  (wrk -t1 -c$conns -d${duration}s --latency, 1 KiB body)"
echo
echo "| server (1 worker, CPU 0) | req/s | p50 | p99 |"
echo "|---|---|---|---|"
run "edge-filter hit (proxy_wasm)" "$p_filter"
run "nginx proxy_cache hit" "$p_cache"
run "nginx static file" "$p_file"
run "nginx \`return 200\` (no filter)" "$p_return" /return
run "nginx \`return 200\` + no-op Proxy-Wasm filter" "$p_return" /noop
if [ "$pairs" -gt 0 ]; then
    rps() { taskset -c 1 wrk -t1 -c"$conns" -d"${duration}s" "http://127.0.0.1:$1/obj" | awk '/^Requests\/sec/ {print $2}'; }
    f=(); c=()
    for _ in $(seq 1 "$pairs"); do f+=("$(rps "$p_filter")"); c+=("$(rps "$p_cache")"); done
    echo
    python3 - "${f[*]}" "${c[*]}" <<'PY'
import statistics, sys
f, c = ([float(x) for x in a.split()] for a in sys.argv[1:3])
ahead = sum(x > y for x, y in zip(f, c))
print(f"{len(f)} interleaved pairs: edge-filter median {statistics.median(f):,.0f} req/s, "
      f"proxy_cache median {statistics.median(c):,.0f} req/s; edge-filter ahead in {ahead} of {len(f)}")
PY
fi
worker="$(pgrep -P "$pid" | head -1)"
echo
echo "worker RSS after the run: $(ps -o rss= -p "$worker" | tr -d ' ') KiB (master $(ps -o rss= -p "$pid" | tr -d ' ') KiB)"
! grep -E '\[(alert|emerg)\]|trapped|panic' "$tmp/error.log" || { echo "bench.sh: errors in error.log" >&2; exit 1; }
