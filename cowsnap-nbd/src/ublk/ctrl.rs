//! The control device `/dev/ublk-control`: one small SQE128 io_uring on which each
//! command (`UBLK_U_CMD_*`, a [`CtrlCmd`] in the 80-byte command area) is submitted
//! and waited for, one at a time. Buffers given by address (ADD_DEV's [`DevInfo`],
//! SET_PARAMS' [`Params`]) live on the caller's stack across the wait.
//!
//! Command numbers: ioctl-encoded first; a driver that answers an encoded command with
//! EOPNOTSUPP, or an encoded ADD_DEV with ENODEV (the 6.0–6.2 drivers look up the
//! device of any command that is not their plain ADD_DEV), gets the plain number, and
//! this control device keeps using the plain numbers from then on ([`Encoding`]).

use super::abi::{self, cmd, CtrlCmd, DevInfo, Encoding, Params};
use cowsnap_core::error::{Error, Result};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The refusal when the driver is not there.
pub const NO_DRIVER: &str =
    "--via ublk needs the ublk_drv module: /dev/ublk-control not found (modprobe ublk_drv, \
     Linux 6.0 or later; or use --via nbd or --via fuse)";

/// An open control device.
pub struct Control {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    fd: File,
    enc: Encoding,
}

impl Control {
    /// Open `/dev/ublk-control` (`path` in tests).
    pub fn open_at(path: &Path) -> Result<Control> {
        if !path.exists() {
            return Err(cowsnap_core::err!(NotFound, "{NO_DRIVER}"));
        }
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io(format!("unable to open {}", path.display()), e))?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(|e| Error::io("unable to set up an io_uring (SQE128) for ublk", e))?;
        Ok(Control {
            ring,
            fd,
            enc: Encoding::Ioctl,
        })
    }

    /// Open the control device.
    pub fn open() -> Result<Control> {
        Self::open_at(Path::new(abi::CONTROL_PATH))
    }

    /// The numbering the driver took (the encoded one until a command said otherwise).
    pub fn encoding(&self) -> Encoding {
        self.enc
    }

    /// Submit control command `nr` ([`cmd`]) and wait for its result: in the numbering
    /// known to work, else encoded and, if the driver does not know that, plain.
    fn call(&mut self, nr: u32, c: CtrlCmd, what: &str) -> Result<i32> {
        if self.enc == Encoding::Legacy {
            return self.submit(Encoding::Legacy.ctrl(nr), c, what);
        }
        let first = match self.submit(Encoding::Ioctl.ctrl(nr), c, what) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        let unknown = first.errno() == libc::EOPNOTSUPP
            || (nr == cmd::ADD_DEV && first.errno() == libc::ENODEV);
        if !unknown {
            return Err(first);
        }
        match self.submit(Encoding::Legacy.ctrl(nr), c, what) {
            Ok(r) => {
                log::info!("ublk: the driver takes the plain command numbers (Linux 6.0-6.2)");
                self.enc = Encoding::Legacy;
                Ok(r)
            }
            // A driver without the plain numbers: the encoded answer is the real one.
            Err(e) if e.errno() == libc::EOPNOTSUPP || e.errno() == libc::EINVAL => Err(first),
            Err(e) => Err(e),
        }
    }

    /// Submit one command and wait for its result (>= 0, or the errno as an error).
    fn submit(&mut self, op: u32, c: CtrlCmd, what: &str) -> Result<i32> {
        let e = opcode::UringCmd80::new(types::Fd(self.fd.as_raw_fd()), op)
            .cmd(c.to_bytes())
            .build()
            .user_data(1);
        // SAFETY: the entry refers to the control fd (open while `self` lives) and, by
        // `c.addr`, to a buffer of the caller's that stays alive until this function
        // returns, which is after the command's completion has been reaped below.
        unsafe { self.ring.submission().push(&e) }
            .map_err(|_| cowsnap_core::err!(Io, "unable to {what}: the ublk ring is full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(Error::io(format!("unable to {what}"), e)),
            }
            if let Some(cqe) = self.ring.completion().next() {
                let r = cqe.result();
                if r < 0 {
                    return Err(Error::io(
                        format!("unable to {what}"),
                        std::io::Error::from_raw_os_error(-r),
                    ));
                }
                return Ok(r);
            }
        }
    }

    /// ADD_DEV: create a device (the driver picks the id); returns the driver's info.
    pub fn add(&mut self, mut info: DevInfo) -> Result<DevInfo> {
        info.dev_id = u32::MAX;
        let c = CtrlCmd {
            dev_id: u32::MAX,
            queue_id: u16::MAX,
            len: std::mem::size_of::<DevInfo>() as u16,
            addr: &mut info as *mut DevInfo as u64,
            ..Default::default()
        };
        self.call(cmd::ADD_DEV, c, "add a ublk device")?;
        Ok(info)
    }

    /// SET_PARAMS.
    pub fn set_params(&mut self, id: u32, p: &Params) -> Result<()> {
        let c = CtrlCmd {
            dev_id: id,
            queue_id: u16::MAX,
            len: abi::PARAMS_LEN as u16,
            addr: p as *const Params as u64,
            ..Default::default()
        };
        self.call(
            cmd::SET_PARAMS,
            c,
            &format!("set the parameters of ublk device {id}"),
        )
        .map(|_| ())
    }

    /// START_DEV: returns once every queue has fetched every tag and the disk exists.
    pub fn start(&mut self, id: u32) -> Result<()> {
        let c = CtrlCmd {
            dev_id: id,
            queue_id: u16::MAX,
            data: [u64::from(std::process::id())],
            ..Default::default()
        };
        self.call(cmd::START_DEV, c, &format!("start ublk device {id}"))
            .map(|_| ())
    }

    /// STOP_DEV: removes the disk and aborts the queues' outstanding fetches.
    pub fn stop(&mut self, id: u32) -> Result<()> {
        let c = CtrlCmd {
            dev_id: id,
            queue_id: u16::MAX,
            ..Default::default()
        };
        self.call(cmd::STOP_DEV, c, &format!("stop ublk device {id}"))
            .map(|_| ())
    }

    /// DEL_DEV: frees the id. Waits until the device's char device is closed.
    pub fn delete(&mut self, id: u32) -> Result<()> {
        let c = CtrlCmd {
            dev_id: id,
            queue_id: u16::MAX,
            ..Default::default()
        };
        self.call(cmd::DEL_DEV, c, &format!("delete ublk device {id}"))
            .map(|_| ())
    }

    /// GET_DEV_INFO: `None` when there is no such device.
    pub fn info(&mut self, id: u32) -> Result<Option<DevInfo>> {
        let mut info = DevInfo::default();
        let c = CtrlCmd {
            dev_id: id,
            queue_id: u16::MAX,
            len: std::mem::size_of::<DevInfo>() as u16,
            addr: &mut info as *mut DevInfo as u64,
            ..Default::default()
        };
        match self.call(cmd::GET_DEV_INFO, c, "read ublk device info") {
            Ok(_) => Ok(Some(info)),
            Err(e) if e.errno() == libc::ENODEV || e.errno() == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Stop and delete device `id` (the leftovers of a daemon that died: its disk may be
/// gone already, its id still taken). Missing devices are fine.
pub fn remove(id: u32) -> Result<()> {
    let mut c = Control::open()?;
    if c.info(id)?.is_none() {
        return Ok(());
    }
    if let Err(e) = c.stop(id) {
        log::debug!("ublk: stop {id}: {e}");
    }
    c.delete(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_control_device_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let Err(e) = Control::open_at(&dir.path().join("ublk-control")) else {
            panic!("opened a control device that does not exist");
        };
        let s = e.to_string();
        assert!(
            s.contains("--via ublk needs the ublk_drv module: /dev/ublk-control not found"),
            "{s}"
        );
    }
}
