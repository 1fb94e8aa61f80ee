//! cowsnap-nbd: the NBD protocol and server, the per-disk daemon's pieces, and the
//! kernel attach paths (netlink `nbd` family; where nbd.ko is absent, losetup on a FUSE
//! file: the daemon's own FUSE server, or nbdfuse).

pub mod attach;
pub mod attached;
pub mod cli;
pub mod control;
pub mod fuse;
pub mod logging;
pub mod name_lock;
pub mod nbd;
pub mod paths;
pub mod ublk;

#[cfg(test)]
mod test_support;
