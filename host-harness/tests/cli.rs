//! The `proxy-wasm-harness` command: the shipped example scenario passes, a failed
//! expectation exits 1, a broken scenario exits 2, and `--help` documents the format.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_proxy-wasm-harness"))
}

fn here(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn wasm() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| here("../target"));
    target.join("wasm32-wasip1/release/edge_filter.wasm")
}

fn run(scenario: &Path) -> std::process::Output {
    run_with(&wasm(), scenario)
}

fn run_with(module: &Path, scenario: &Path) -> std::process::Output {
    bin()
        .args(["run", "--wasm"])
        .arg(module)
        .arg("--config")
        .arg(here("examples/edge-filter.config.json"))
        .arg("--scenario")
        .arg(scenario)
        .output()
        .expect("runs")
}

#[test]
fn example_scenario_passes() {
    let out = run(&here("examples/edge-filter.scenario.json"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}\nstdout: {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["failed"], 0);
    assert_eq!(report["steps"][1]["exchange"]["client"]["body"], "hello");
    assert_eq!(report["steps"][0]["exchange"]["actions"][0][1], "continue");
}

#[test]
fn failed_expectations_exit_1_and_bad_input_exits_2() {
    let dir = std::env::temp_dir().join(format!("pwh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let failing = dir.join("fail.json");
    std::fs::write(
        &failing,
        r#"{"steps": [{"request": {"path": "/x"}, "upstream": {"body": "a"},
                       "expect": {"status": 404, "headers": {"x-nope": "1"}}}]}"#,
    )
    .unwrap();
    // A filter with no callbacks at all passes everything (and compiles in no time).
    let passthrough = dir.join("passthrough.wasm");
    let module = wat::parse_str(
        r#"(module (memory (export "memory") 1)
           (func (export "malloc") (param i32) (result i32) i32.const 1024)
           (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    std::fs::write(&passthrough, module).unwrap();
    let out = run_with(&passthrough, &failing);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("status: expected 404, got Some(200)"), "{err}");
    assert!(err.contains("header x-nope"), "{err}");
    let broken = dir.join("broken.json");
    std::fs::write(&broken, r#"{"stepz": []}"#).unwrap();
    let out = run_with(&passthrough, &broken);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn help_documents_the_scenario_format() {
    let out = bin().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "SCENARIO FORMAT",
        "advance_ms",
        "expect_metrics",
        "upstream_called",
        "Exit status",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}");
    }
}
