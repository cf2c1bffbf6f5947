//! The one-shot commands, one file each: they do the work and return what
//! happened; the binary (`main.rs`) prints it. `run` is the service:
//! [`crate::leader`].

pub mod blocklist;
pub mod init;
pub mod recycle;
pub mod reserve;
pub mod stats;
