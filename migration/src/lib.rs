//! Live migration and snapshot building blocks: the versioned snapshot format, the wire
//! protocol with its strict receiver, UNIX/TCP channels with descriptor passing, and migration
//! URLs. Each device's state is its own type, in the `devices` crate; this crate carries it.
//!
//! This crate depends on no other crate of baton's but `fd_passing`, and knows nothing of KVM
//! or devices, so everything in it is tested on its own: sessions cut short in
//! `tests/truncated.rs`, hostile input from the fuzz targets in `fuzz/`.
//!
//! - [`snapshot`]: header + checksum + serde payload, for state files and State requests.
//! - [`url`]: `unix:`, `tcp:` and `file:` locations.
//! - [`protocol`]: frames, payloads, limits, the [`Receiver`] state machine, memory streaming.
//! - [`transport`]: [`Channel`] and [`Listener`].
//! - [`session`]: the destination's request loop over a [`Destination`], the source's Start.
//! - [`timing`]: a [`Timeline`](timing::Timeline) of steps, for the downtime breakdown.
#![warn(missing_docs)]

pub mod protocol;
pub mod session;
pub mod snapshot;
pub mod timing;
pub mod transport;
pub mod url;

pub use protocol::{Command, Limits, ProtocolError, Receiver, Response};
pub use session::{Destination, Outcome};
pub use snapshot::SnapshotError;
pub use transport::{Channel, Listener};
pub use url::{MigrationUrl, UrlError};

/// Any error, with its chain, from code this crate calls back into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
