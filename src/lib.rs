//! `wallet`: a digital-wallet engine. See ARCHITECTURE.md for the module map.

pub mod alloc;
pub mod api;
pub mod core;
pub mod engine;
pub mod journal;
pub mod replicate;
pub mod tools;
pub mod views;
