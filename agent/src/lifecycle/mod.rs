//! The update lifecycle of each desired bundle: fetch, verify, wait for the
//! maintenance window, install, report. One task owns it; the heartbeat
//! loop hands it the desired state through a `watch` channel and it
//! publishes per-bundle status through another.
//!
//! - `model`: the desired state, the bundles' statuses and the report;
//! - `decide`: what to do next for one bundle, a pure function of the
//!   desired bundle, the active version, the last status and the clock,
//!   unit-tested;
//! - `engine`: the task that gathers those, carries each step out and
//!   publishes the statuses.

mod decide;
mod engine;
mod model;

pub use engine::{Clock, Lifecycle};
pub(crate) use engine::{load_desired, save_desired};
pub use model::{Desired, DesiredState, Report};
