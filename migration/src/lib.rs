//! Live migration and snapshot building blocks: the traits devices implement to be paused,
//! saved and handed over, the versioned snapshot format, the wire protocol and its transports.
//!
//! This crate depends on no other crate of baton's, so it can be fuzzed on its own. It is
//! filled by the snapshot/migration issue; for now it only fixes its place in the crate graph.
#![warn(missing_docs)]
