//! The shared end-to-end scenarios (`edge_filter_e2e::scenarios`) in the stock Debian
//! nginx with the ngx-proxy-wasm module and `nginx/conf/nginx.conf`, 2 workers (or
//! `$EDGE_FILTER_NGINX_WORKERS`). `E2E_SCENARIOS=a,b` runs only the scenarios named.
//! A missing module fails with how to build it; `EDGE_FILTER_SKIP_NGINX=1` skips.

use edge_filter_e2e::nginx;
use edge_filter_e2e::scenarios::{self, NginxLauncher};

#[test]
fn shared_scenarios_pass_in_nginx() {
    if nginx::skipped() {
        return;
    }
    scenarios::run(&NginxLauncher::from_env());
}
