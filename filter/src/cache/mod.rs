//! The response cache's host-independent logic, one concern per module.
//!
//! The crate-wide lint (`lib.rs`) forbids indexing, slicing, unwrap and panic outside
//! tests; the store and its eviction policy index their own bounded tables, not wire data,
//! and are exempt from the indexing lint by name.

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
