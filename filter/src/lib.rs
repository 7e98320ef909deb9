//! edge-filter: a Proxy-Wasm filter that gives Envoy (and nginx) an RFC 9111 response cache,
//! Prometheus metrics and health endpoints.
//!
//! Everything but [`glue`] is host-independent and tested natively; the glue moves headers and
//! bytes between the host and those modules, and only exists in the `.wasm`.
#![deny(missing_docs)]
// Nothing that reads bytes from a client, an upstream or shared data may index, slice,
// unwrap or panic outside its tests: a lint, not a review, keeps a hostile byte from killing
// the VM. The store and its eviction policy index their own bounded tables and say so.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::string_slice,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

pub mod cache;
pub mod config;
pub mod field;
pub mod health;
pub mod metrics;

#[cfg(target_arch = "wasm32")]
mod glue;

/// The crate version, reported as `version` in health documents.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The build, reported as `releaseId`: the version plus `EDGE_FILTER_BUILD` when the build
/// sets it (the run and test scripts pass the git commit).
pub fn release_id() -> String {
    match option_env!("EDGE_FILTER_BUILD") {
        Some(b) if !b.is_empty() => format!("{VERSION}+{b}"),
        _ => VERSION.to_string(),
    }
}
