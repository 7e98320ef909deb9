//! edge-filter: a Proxy-Wasm filter that gives Envoy (and nginx) an RFC 9111 response cache,
//! Prometheus metrics and health endpoints.
//!
//! Everything but [`glue`] is host-independent and tested natively; the glue moves headers and
//! bytes between the host and those modules, and only exists in the `.wasm`.
#![deny(missing_docs)]

pub mod cache;
pub mod config;
#[cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::string_slice,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]
pub mod field;
pub mod health;
pub mod metrics;

// The glue handles every byte from the client and the upstream: no panics there either.
#[cfg(target_arch = "wasm32")]
#[deny(
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
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
