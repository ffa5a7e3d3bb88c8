//! Live migration and snapshot building blocks: the traits the VMM's parts implement to be
//! paused and saved, the versioned snapshot format, the wire protocol with its strict
//! receiver, UNIX/TCP channels with descriptor passing, and migration URLs.
//!
//! This crate depends on no other crate of baton's and knows nothing of KVM or devices, so
//! everything in it is tested (and fed hostile input, see `tests/garbage.rs`) on its own.
//!
//! - [`snapshot`]: header + checksum + serde payload, for state files and State requests.
//! - [`url`]: `unix:`, `tcp:` and `file:` locations.
//! - [`protocol`]: frames, payloads, limits, the [`Receiver`] state machine, memory streaming.
//! - [`transport`]: [`Channel`] and [`Listener`].
//! - [`session`]: the destination's request loop over a [`Destination`], the source's Start.
#![warn(missing_docs)]

pub mod protocol;
pub mod session;
pub mod snapshot;
pub mod transport;
pub mod url;

pub use protocol::{Command, Limits, ProtocolError, Receiver, Response};
pub use session::{Destination, Outcome};
pub use snapshot::SnapshotError;
pub use transport::{Channel, Listener};
pub use url::{MigrationUrl, UrlError};

/// Any error, with its chain, from code this crate calls back into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a part of the VM could not be paused, resumed, saved or restored. The cause keeps its
/// chain; `"text".into()` and `format!(..).into()` make one from a message.
#[derive(Debug, thiserror::Error)]
pub enum MigratableError {
    /// Pausing failed.
    #[error("Cannot pause")]
    Pause(#[source] BoxError),
    /// Resuming failed.
    #[error("Cannot resume")]
    Resume(#[source] BoxError),
    /// Saving state failed.
    #[error("Cannot save state")]
    Snapshot(#[source] BoxError),
    /// Building from saved state failed.
    #[error("Cannot restore state")]
    Restore(#[source] BoxError),
}

/// A part of the VM that can stop touching guest memory and its backend, and start again.
/// Pause returns only once the part is quiescent; resume undoes pause exactly.
pub trait Pausable {
    /// Stops; idempotent.
    fn pause(&mut self) -> Result<(), MigratableError>;
    /// Starts again; idempotent.
    fn resume(&mut self) -> Result<(), MigratableError>;
}

/// A part of the VM whose state is saved under a stable id. The state itself is each part's
/// own serde type, saved with [`snapshot::encode`] and restored by construction.
pub trait Snapshottable {
    /// The id its state is filed under: unique in the VM, equal on both sides of a migration.
    fn snapshot_id(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migratable_error_keeps_its_cause() {
        let e = MigratableError::Pause(format!("worker {} did not stop", 3).into());
        assert_eq!(
            protocol::error_chain(&e),
            "Cannot pause: worker 3 did not stop"
        );
        let io = std::io::Error::other("EBADF");
        let e = MigratableError::Restore(Box::new(io));
        assert_eq!(protocol::error_chain(&e), "Cannot restore state: EBADF");
    }
}
