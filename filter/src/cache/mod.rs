//! The response cache's host-independent logic, one concern per module.
//!
//! The modules that read bytes from the wire (headers, targets, stored entries) may not
//! index, slice, unwrap or panic outside their tests: a lint, not a review, keeps a hostile
//! byte from killing the VM. The store and its eviction policy index their own bounded
//! tables, not wire data, and are exempt.
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

pub mod bypass;
pub mod cache_control;
pub mod conditional;
pub mod entry;
#[allow(clippy::indexing_slicing)]
pub mod eviction;
pub mod freshness;
pub mod key;
pub mod lookup;
pub mod normalize;
pub mod policy;
pub mod purge;
pub mod query;
pub mod range;
pub mod status;
#[allow(clippy::indexing_slicing)]
pub mod store;
pub mod targeted;
pub mod vary;
