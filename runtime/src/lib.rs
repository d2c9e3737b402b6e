//! What both posfleet programs need at run time: the maintenance-window
//! rules the control plane and the agent apply identically, layered
//! configuration, logging, the shutdown signal and crash-safe private files.
//!
//! It knows no network, database or business state: each program keeps its
//! own settings and decisions, and comes here for the rules and the
//! plumbing they must share.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod files;
pub mod logging;
pub mod plaintext;
pub mod signal;
pub mod window;

pub use error::{ConfigError, WindowError};
pub use logging::{LogFormat, init_tracing, init_tracing_with};
pub use signal::shutdown_signal;
