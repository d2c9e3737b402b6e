//! The posfleet point-of-sale agent: enrolls its terminal with a one-time
//! token, then reports its versions and health to the control plane,
//! working on whatever the network does.
#![forbid(unsafe_code)]

mod agent;
pub mod backoff;
pub mod config;
pub mod error;
pub mod fetch;
mod files;
pub mod health;
pub mod hooks;
pub mod identity;
pub mod install;
pub mod lifecycle;
pub mod repository;
pub mod sharing;
pub mod state;
/// The maintenance-window rules, the same as the control plane's.
pub use posfleet_runtime::window;

pub use agent::{AGENT_VERSION, Agent};
