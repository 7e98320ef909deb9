//! The response cache's host-independent logic, one concern per module.

pub mod cache_control;
pub mod conditional;
pub mod entry;
pub mod eviction;
pub mod freshness;
pub mod key;
pub mod lookup;
pub mod policy;
pub mod status;
pub mod store;
pub mod vary;
