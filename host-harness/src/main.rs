//! `proxy-wasm-harness`: runs a Proxy-Wasm module through a scenario without a proxy.

use clap::{Parser, Subcommand};
use proxy_wasm_harness::scenario::Scenario;
use proxy_wasm_harness::Harness;
use std::path::PathBuf;
use std::process::ExitCode;

const SCENARIO_HELP: &str = r#"SCENARIO FORMAT (JSON; every field optional unless noted)

{
  "description": "text",
  "vm_id": "edge-filter",            shared data and queues are per vm_id
  "vms": 2,                          VMs sharing the host state, like Envoy workers (default 1)
  "failure_policy": "FAIL_CLOSED",   or "FAIL_OPEN": what streams get after a trap
  "cas_mode": "envoy",               or "strict_per_key" (Kong's shared-data CAS rules)
  "clusters": {                      clusters proxy_http_call can reach; others: BadArgument
    "upstream": {"status": 200, "headers": [["k", "v"]], "body": "ok", "delay_ms": 3}
  },                                 status 0: the call fails (connection reset)
  "steps": [                         run in order; each step may have any of:
    {"name": "miss",
     "vm": 0,                        which VM runs the request (0-based)
     "request": {"method": "GET", "path": "/page", "authority": "example.com",
                 "scheme": "http", "headers": [["accept", "*/*"]],
                 "body": "", "chunks": [4, 4], "trailers": []},
     "upstream": {"status": 200, "headers": [["cache-control", "max-age=60"]],
                  "body": "hello", "chunks": [2], "trailers": []},
                                     the upstream's answer if the request reaches it
     "expect": {"status": 200, "body": "hello", "body_contains": "ell",
                "headers": {"cache-status": "edge-filter; hit; ttl=60", "age": null},
                "headers_contain": {"cache-status": "stored"},
                "upstream_called": false, "local_reply": true, "trap": false},
     "advance_ms": 1000,             move the virtual clock first (ticks, http_call answers)
     "expect_metrics": {"edge_filter_cache_stores_total": 1}}
  ]
}

A header expectation of null means the header must be absent. Metric values are
counters, gauges, or a histogram's number of samples. The clock starts at
2026-01-01T00:00:00Z and moves only with advance_ms.

OUTPUT: a JSON report on stdout: for each step the exchange (actions, what reached the
upstream and the client, local reply, trap) and any failed expectations, then "failed"
(their number) and the guest's log lines. Exit status: 0 when every expectation holds,
1 when some fail, 2 when the module or scenario cannot be run."#;

#[derive(Parser)]
#[command(
    name = "proxy-wasm-harness",
    version,
    about = "Runs Proxy-Wasm filters without a proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a scenario file through a module and prints what was observed as JSON.
    #[command(after_long_help = SCENARIO_HELP, after_help = "See --help for the scenario format.")]
    Run {
        /// The Proxy-Wasm module (.wasm).
        #[arg(long)]
        wasm: PathBuf,
        /// The plugin configuration file (passed to on_configure as it is).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The scenario file.
        #[arg(long)]
        scenario: PathBuf,
    },
}

fn run(wasm: PathBuf, config: Option<PathBuf>, scenario: PathBuf) -> Result<bool, String> {
    let text = std::fs::read_to_string(&scenario)
        .map_err(|e| format!("reading {}: {e}", scenario.display()))?;
    let sc: Scenario =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", scenario.display()))?;
    let config = match config {
        Some(p) => std::fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?,
        None => Vec::new(),
    };
    let report = sc
        .run(Harness::from_file(&wasm).plugin_config(config))
        .map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    println!("{json}");
    for s in &report.steps {
        for f in &s.failures {
            eprintln!("step {} {}: {f}", s.step, s.name);
        }
    }
    Ok(report.failed == 0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            wasm,
            config,
            scenario,
        } => match run(wasm, config, scenario) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("proxy-wasm-harness: {e}");
                ExitCode::from(2)
            }
        },
    }
}
