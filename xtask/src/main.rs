//! Project tasks that are easier to keep correct in Rust than in shell.
//!
//! ```text
//! cargo run -p xtask -- oci [--wasm FILE] [--out DIR] [--tag TAG]
//! cargo run -p xtask -- k8s-envoy [--check]
//! cargo run -p xtask -- check-config FILE...
//! cargo run -p xtask --release -- sim [--replicas N] [--objects N] [--requests N] [--zipf S] [--capacity N]
//! ```
//!
//! Paths are relative to the workspace root, whatever the current directory.

mod error;
mod k8s_envoy;
mod oci;
mod sim;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use error::Error;

const USAGE: &str = "usage: cargo run -p xtask -- <command>

commands:
  oci [--wasm FILE] [--out DIR] [--tag TAG]
        write OCI image layouts of the filter: DIR/wasm (Wasm artifact media types) and
        DIR/compat (single-layer image with plugin.wasm); defaults: the release .wasm,
        target/oci, the crate version
  k8s-envoy [--check]
        generate k8s/base/envoy.yaml and k8s/istio/custom_bootstrap.json from envoy/envoy.yaml;
        --check compares instead of writing and fails on any difference
  check-config FILE...
        parse each file as plugin configuration with the filter's own parser
  sim [--replicas N] [--objects N] [--requests N] [--zipf S] [--capacity N] [--seed N]
        simulate the hit ratio of a consistent-hash cache tier against an unsharded cache of
        the same total size and against round-robin replicas";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Usage(msg)) => {
            eprintln!("xtask: {msg}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), Error> {
    let root = workspace_root();
    let Some((cmd, rest)) = args.split_first() else {
        return Err(Error::Usage("no command given".into()));
    };
    match cmd.as_str() {
        "oci" => {
            let mut opts = Opts::parse(rest, &["--wasm", "--out", "--tag"], &[])?;
            let wasm = opts.path(
                &root,
                "--wasm",
                "target/wasm32-wasip1/release/edge_filter.wasm",
            );
            let out = opts.path(&root, "--out", "target/oci");
            let tag = opts
                .value("--tag")
                .unwrap_or_else(|| edge_filter::VERSION.to_string());
            let summary = oci::write_layouts(&wasm, &out, &tag)?;
            println!("{summary}");
            Ok(())
        }
        "k8s-envoy" => {
            let opts = Opts::parse(rest, &[], &["--check"])?;
            k8s_envoy::run(&root, opts.flag("--check"))
        }
        "check-config" => {
            if rest.is_empty() {
                return Err(Error::Usage("check-config needs at least one file".into()));
            }
            let mut failed = 0;
            for file in rest {
                let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
                // The VM environment (purge.token_env) is the deployment's to provide: any
                // variable named here counts as set.
                let env = |name: &str| Some(format!("<{name} from the VM environment>"));
                match edge_filter::config::Config::parse_with_env(&bytes, env) {
                    Ok(_) => println!("ok: {file}"),
                    Err(e) => {
                        println!("invalid: {file}: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                return Err(Error::Invalid(format!(
                    "{failed} of {} configurations rejected",
                    rest.len()
                )));
            }
            Ok(())
        }
        "sim" => {
            let mut opts = Opts::parse(
                rest,
                &[
                    "--replicas",
                    "--objects",
                    "--requests",
                    "--zipf",
                    "--capacity",
                    "--seed",
                ],
                &[],
            )?;
            let params = sim::Params {
                replicas: opts.number("--replicas", 4)?,
                objects: opts.number("--objects", 100_000)?,
                requests: opts.number("--requests", 2_000_000)?,
                zipf_s: opts.number("--zipf", 0.9)?,
                capacity_per_replica: opts.number("--capacity", 2_500)?,
                seed: opts.number("--seed", 7)?,
            };
            print!("{}", sim::report(&params)?);
            Ok(())
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Error::Usage(format!("unknown command `{other}`"))),
    }
}

/// The workspace root: this crate's parent directory (xtask always lives at `<root>/xtask`).
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// `--name value` options and `--flag` switches; anything else is a usage error.
struct Opts {
    values: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Opts {
    fn parse(args: &[String], valued: &[&str], flags: &[&str]) -> Result<Self, Error> {
        let mut opts = Opts {
            values: Vec::new(),
            flags: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            if valued.contains(&arg.as_str()) {
                let v = it
                    .next()
                    .ok_or_else(|| Error::Usage(format!("{arg} needs a value")))?;
                opts.values.push((arg.clone(), v.clone()));
            } else if flags.contains(&arg.as_str()) {
                opts.flags.push(arg.clone());
            } else {
                return Err(Error::Usage(format!("unexpected argument `{arg}`")));
            }
        }
        Ok(opts)
    }

    fn value(&mut self, name: &str) -> Option<String> {
        let i = self.values.iter().rposition(|(n, _)| n == name)?;
        Some(self.values.remove(i).1)
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    /// A path option, relative paths taken from the workspace root.
    fn path(&mut self, root: &Path, name: &str, default: &str) -> PathBuf {
        let p = self.value(name).unwrap_or_else(|| default.to_string());
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            root.join(p)
        }
    }

    fn number<T: std::str::FromStr>(&mut self, name: &str, default: T) -> Result<T, Error> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| Error::Usage(format!("{name}: `{v}` is not a valid number"))),
        }
    }
}
