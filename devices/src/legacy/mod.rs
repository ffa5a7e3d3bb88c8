//! Legacy PC platform devices on port I/O.

mod cmos;
mod i8042;
mod serial;

pub use cmos::Cmos;
pub use i8042::I8042;
pub use serial::Serial;
