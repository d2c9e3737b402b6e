//! The posfleet point-of-sale agent: enrolls its terminal with a one-time
//! token, then reports its versions and health to the control plane,
//! working on whatever the network does.
#![forbid(unsafe_code)]

mod agent;
mod backoff;
pub mod config;
mod error;
pub mod fetch;
mod files;
mod health;
mod hooks;
mod identity;
pub mod install;
pub mod lifecycle;
pub mod logs;
pub mod repository;
pub mod selfupdate;
mod sharing;
pub mod signals;
mod state;
pub mod supervisor;
mod tls;
/// The maintenance-window rules, the same as the control plane's.
use posfleet_runtime::window;

pub use agent::{AGENT_VERSION, Agent};
pub use error::Error;
pub use hooks::HookUser;
