//! Legacy PC platform devices on port I/O.

mod cmos;
mod i8042;
mod serial;

pub use cmos::{Cmos, CmosState};
pub use i8042::I8042;
pub use serial::{Serial, SerialState};
