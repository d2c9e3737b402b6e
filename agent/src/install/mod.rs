//! The bundle slots of one data dir, and installing into them.
//!
//! ```text
//! <data_dir>/slots/<name>/<version>/     one unpacked bundle, always whole
//! <data_dir>/slots/<name>/current        symlink to `<version>`: the active one
//! <data_dir>/slots/<name>/journal.json   what is in flight for <name>
//! ```
//!
//! A slot directory is whole or absent: a bundle is unpacked into
//! `.staging-<version>`, synced and renamed into place, and a slot is
//! removed by renaming it to `.trash-<version>` first. `current` is switched
//! by renaming a new link over it. The journal is written (atomically)
//! before `current` changes, so after a crash [`Slots::recover`] knows
//! whether the version `current` names was confirmed healthy, and puts back
//! the one before it if not. What it does is a pure function of the journal
//! and of what is on disk, so a crash during recovery is recovered the same
//! way.
//!
//! - `recovery`: that decision (journal and disk in, changes out), with no
//!   I/O, unit-tested;
//! - `disk`: the primitives on disk (switching `current`, removing a slot,
//!   the journal, syncs, unpacking);
//! - `slots`: the A/B slot model, installs and rollbacks. With the
//!   `test-hooks` feature, crash tests stop installs at `CrashPoint`s.

pub(crate) mod disk;
mod recovery;
mod slots;

pub(crate) use recovery::{Link, LinkChange};
pub use recovery::{Recovery, RecoveryAction};
#[cfg(feature = "test-hooks")]
pub use slots::CrashPoint;
pub use slots::{Outcome, Slots};
