//! The Linux interfaces kernel dirty tracking is built on, declared here because the
//! `libc` crate does not carry them: userfaultfd in asynchronous write-protect mode
//! (`include/uapi/linux/userfaultfd.h`, Linux 6.7+) and the `PAGEMAP_SCAN` ioctl on
//! `/proc/self/pagemap` (`include/uapi/linux/fs.h`, Linux 6.7+).
//!
//! How they work together: a range registered with `UFFDIO_REGISTER_MODE_WP` and
//! write-protected with `UFFDIO_WRITEPROTECT` takes a minor fault at the first write to
//! each 4 KiB page; with `UFFD_FEATURE_WP_ASYNC` the kernel resolves that fault itself
//! (no handler thread) by clearing the page's write-protect bit. `PAGEMAP_SCAN` then
//! lists the pages whose bit is clear (`PAGE_IS_WRITTEN`) and, with
//! `PM_SCAN_WP_MATCHING`, sets it again on exactly those pages, atomically per page.

#![allow(non_camel_case_types)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const UFFD_API: u64 = 0xAA;
/// Handle only faults from user mode: allowed without privilege whatever
/// `vm.unprivileged_userfaultfd` says. Async write-protect faults never reach a handler.
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
pub struct uffdio_api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct uffdio_range {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct uffdio_register {
    pub range: uffdio_range,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct uffdio_writeprotect {
    pub range: uffdio_range,
    pub mode: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct pm_scan_arg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct page_region {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `_IOWR`/`_IOR` as the kernel's `asm-generic/ioctl.h` defines them (x86, arm, riscv).
const fn ioc(dir: u64, kind: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((kind as u64) << 8) | nr as u64
}
const READ_WRITE: u64 = 3;
const READ: u64 = 2;

pub const UFFDIO_API: u64 = ioc(READ_WRITE, 0xAA, 0x3F, size_of::<uffdio_api>());
pub const UFFDIO_REGISTER: u64 = ioc(READ_WRITE, 0xAA, 0x00, size_of::<uffdio_register>());
pub const UFFDIO_UNREGISTER: u64 = ioc(READ, 0xAA, 0x01, size_of::<uffdio_range>());
pub const UFFDIO_WRITEPROTECT: u64 = ioc(READ_WRITE, 0xAA, 0x06, size_of::<uffdio_writeprotect>());
pub const PAGEMAP_SCAN: u64 = ioc(READ_WRITE, b'f', 16, size_of::<pm_scan_arg>());

/// `ioctl(fd, request, arg)`, returning its non-negative result or the error.
///
/// # Safety
/// `arg` must point to the structure `request` reads and writes.
unsafe fn ioctl<T>(fd: &impl AsRawFd, request: u64, arg: *mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller passes the structure the request expects.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as libc::c_long)
    }
}

/// A userfaultfd in asynchronous write-protect mode, with unpopulated pages protected too.
pub fn open_async_wp_userfaultfd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: userfaultfd takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let wanted = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    let mut api = uffdio_api {
        api: UFFD_API,
        features: wanted,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a uffdio_api.
    unsafe { ioctl(&fd, UFFDIO_API, &mut api) }?;
    if api.features & wanted != wanted {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel lacks asynchronous write-protect userfaultfd",
        ));
    }
    Ok(fd)
}

pub fn register_wp(uffd: &OwnedFd, start: usize, len: usize) -> io::Result<()> {
    let mut reg = uffdio_register {
        range: uffdio_range {
            start: start as u64,
            len: len as u64,
        },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register.
    unsafe { ioctl(uffd, UFFDIO_REGISTER, &mut reg) }.map(drop)
}

pub fn unregister(uffd: &OwnedFd, start: usize, len: usize) -> io::Result<()> {
    let mut range = uffdio_range {
        start: start as u64,
        len: len as u64,
    };
    // SAFETY: UFFDIO_UNREGISTER reads a uffdio_range.
    unsafe { ioctl(uffd, UFFDIO_UNREGISTER, &mut range) }.map(drop)
}

pub fn write_protect(uffd: &OwnedFd, start: usize, len: usize) -> io::Result<()> {
    let mut wp = uffdio_writeprotect {
        range: uffdio_range {
            start: start as u64,
            len: len as u64,
        },
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads a uffdio_writeprotect.
    unsafe { ioctl(uffd, UFFDIO_WRITEPROTECT, &mut wp) }.map(drop)
}

/// Report every written page in `[start, end)` as `(start, end)` byte ranges, and protect
/// those pages again. Fails (`EPERM`) rather than skipping a part of the range that is not
/// registered for asynchronous write-protection; pages reported before the failure are
/// already protected again, so the caller must treat the whole range as dirty then.
pub fn scan_written_and_protect(
    pagemap: &File,
    start: usize,
    end: usize,
    regions: &mut [page_region],
    mut found: impl FnMut(u64, u64),
) -> io::Result<()> {
    let mut from = start as u64;
    while from < end as u64 {
        let mut arg = pm_scan_arg {
            size: size_of::<pm_scan_arg>() as u64,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start: from,
            end: end as u64,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN reads and writes a pm_scan_arg, and writes at most
        // `vec_len` page_regions to `vec`, which `regions` holds.
        let filled = unsafe { ioctl(pagemap, PAGEMAP_SCAN, &mut arg) }? as usize;
        for region in &regions[..filled.min(regions.len())] {
            found(region.start, region.end);
        }
        if arg.walk_end <= from {
            return Err(io::Error::other(format!(
                "PAGEMAP_SCAN made no progress at {from:#x}"
            )));
        }
        from = arg.walk_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From the kernel headers, as `printf("%lx", UFFDIO_API)` etc. print them.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }
}
