//! The WASI preview 1 calls wasnap serves itself, shadowing `wasmtime-wasi`'s: those that
//! would block past a guest call's time limit, or change host state a restore cannot
//! bring back.
//!
//! - `poll_oneoff`: clock subscriptions sleep, but never past the call's deadline
//!   (`--call-timeout-ms`): a sleep that would end after it fails the call at once.
//!   The standard streams are always ready (stdin is the task's input or empty, stdout
//!   and stderr never block), so a subscription on one of them returns without sleeping.
//! - `fd_close`, `fd_renumber`, `fd_fdstat_set_flags` on the standard streams answer
//!   `notsup`: the descriptor table lives in the host, outside any snapshot, so a stream
//!   closed before a checkpoint would be open again after a restore. A guest has no other
//!   descriptors (no preopened directories), so every other descriptor is `badf`.
//!
//! The monotonic clock counts from the wall clock at instantiation, so it does not go
//! back when a task resumes in a new process (wasmtime's own starts near zero each time).

use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use wasmtime::{Caller, Linker};

use super::abi::WASI_MODULE;
use super::host::{HostState, abi_memory};

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const ERRNO_NOTSUP: i32 = 58;

const CLOCK_REALTIME: u32 = 0;
const CLOCK_MONOTONIC: u32 = 1;
const EVENTTYPE_CLOCK: u8 = 0;
const EVENTTYPE_FD_READ: u8 = 1;
const EVENTTYPE_FD_WRITE: u8 = 2;
const SUBCLOCK_ABSTIME: u16 = 1;
const SUBSCRIPTION_LEN: usize = 48;
const EVENT_LEN: usize = 32;

/// The guest's monotonic clock: nanoseconds since the Unix epoch at instantiation, then
/// counted by the host's monotonic clock.
#[derive(Clone, Copy, Debug)]
pub struct GuestClock {
    origin_ns: u64,
    origin: Instant,
}

impl GuestClock {
    pub fn new() -> Self {
        let origin_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            origin_ns,
            origin: Instant::now(),
        }
    }

    pub fn now(&self) -> u64 {
        self.origin_ns
            .saturating_add(self.origin.elapsed().as_nanos() as u64)
    }
}

impl wasmtime_wasi::HostMonotonicClock for GuestClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        GuestClock::now(self)
    }
}

pub(super) fn add_host_functions(linker: &mut Linker<HostState>) -> Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap(WASI_MODULE, "poll_oneoff", poll_oneoff)?;
    linker.func_wrap(
        WASI_MODULE,
        "fd_close",
        |_: Caller<'_, HostState>, fd: i32| standard_stream_fixed(fd),
    )?;
    linker.func_wrap(
        WASI_MODULE,
        "fd_renumber",
        |_: Caller<'_, HostState>, fd: i32, to: i32| match standard_stream_fixed(fd)? {
            ERRNO_NOTSUP => Ok(ERRNO_NOTSUP),
            _ => standard_stream_fixed(to),
        },
    )?;
    linker.func_wrap(
        WASI_MODULE,
        "fd_fdstat_set_flags",
        |_: Caller<'_, HostState>, fd: i32, _flags: i32| standard_stream_fixed(fd),
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The answer to a call that would change descriptor `fd`.
fn standard_stream_fixed(fd: i32) -> wasmtime::Result<i32> {
    Ok(if (0..=2).contains(&fd) {
        ERRNO_NOTSUP
    } else {
        ERRNO_BADF
    })
}

/// One subscription, as far as wasnap needs it.
enum Subscription {
    /// Fires at this many nanoseconds from now.
    Clock {
        userdata: u64,
        wait_ns: u64,
    },
    Fd {
        userdata: u64,
        kind: u8,
        fd: u32,
    },
}

fn read_subscriptions(
    memory: &[u8],
    at: usize,
    count: usize,
    clock: &GuestClock,
) -> Option<Vec<Subscription>> {
    let bytes = memory.get(at..at.checked_add(count.checked_mul(SUBSCRIPTION_LEN)?)?)?;
    let u64_at = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().unwrap());
    let u32_at = |s: &[u8], i: usize| u32::from_le_bytes(s[i..i + 4].try_into().unwrap());
    bytes
        .chunks_exact(SUBSCRIPTION_LEN)
        .map(|s| {
            let userdata = u64_at(s, 0);
            Some(match s[8] {
                EVENTTYPE_CLOCK => {
                    let (id, timeout) = (u32_at(s, 16), u64_at(s, 24));
                    let flags = u16::from_le_bytes([s[40], s[41]]);
                    let wait_ns = if flags & SUBCLOCK_ABSTIME == 0 {
                        timeout
                    } else {
                        let now = match id {
                            CLOCK_MONOTONIC => clock.now(),
                            CLOCK_REALTIME => SystemTime::now()
                                .duration_since(SystemTime::UNIX_EPOCH)
                                .map_or(0, |d| d.as_nanos() as u64),
                            _ => return None,
                        };
                        timeout.saturating_sub(now)
                    };
                    if id != CLOCK_MONOTONIC && id != CLOCK_REALTIME {
                        return None;
                    }
                    Subscription::Clock { userdata, wait_ns }
                }
                kind @ (EVENTTYPE_FD_READ | EVENTTYPE_FD_WRITE) => Subscription::Fd {
                    userdata,
                    kind,
                    fd: u32_at(s, 16),
                },
                _ => return None,
            })
        })
        .collect()
}

/// `poll_oneoff(in, out, nsubscriptions, nevents) -> errno`.
fn poll_oneoff(
    mut caller: Caller<'_, HostState>,
    subscriptions: i32,
    events: i32,
    count: i32,
    nevents: i32,
) -> wasmtime::Result<i32> {
    let count = count as u32 as usize;
    if count == 0 {
        return Ok(ERRNO_INVAL);
    }
    let memory = abi_memory(&mut caller)?;
    let clock = caller.data().clock;
    let Some(subs) = read_subscriptions(
        memory.data(&caller),
        subscriptions as u32 as usize,
        count,
        &clock,
    ) else {
        return Ok(ERRNO_FAULT);
    };
    let ready: Vec<[u8; EVENT_LEN]> = subs
        .iter()
        .filter_map(|s| match *s {
            Subscription::Fd { userdata, kind, fd } => {
                let errno = if fd <= 2 { ERRNO_SUCCESS } else { ERRNO_BADF };
                Some(event(userdata, errno, kind))
            }
            Subscription::Clock { .. } => None,
        })
        .collect();
    let ready = if ready.is_empty() {
        // Only clocks: sleep until the first fires, unless that is past the deadline.
        let wait = subs
            .iter()
            .filter_map(|s| match *s {
                Subscription::Clock { wait_ns, .. } => Some(wait_ns),
                Subscription::Fd { .. } => None,
            })
            .min()
            .expect("at least one subscription");
        let wait = Duration::from_nanos(wait);
        if let Some((deadline, limit)) = caller.data().call_deadline
            && Instant::now()
                .checked_add(wait)
                .is_none_or(|end| end > deadline)
        {
            return Err(wasmtime::Error::msg(format!(
                "the guest asked to sleep {} ms in poll_oneoff, past its time limit of {} ms per call",
                wait.as_millis(),
                limit.as_millis()
            )));
        }
        std::thread::sleep(wait);
        subs.iter()
            .filter_map(|s| match *s {
                Subscription::Clock { userdata, wait_ns }
                    if Duration::from_nanos(wait_ns) <= wait =>
                {
                    Some(event(userdata, ERRNO_SUCCESS, EVENTTYPE_CLOCK))
                }
                _ => None,
            })
            .collect()
    } else {
        ready
    };
    let data = memory.data_mut(&mut caller);
    let out: Vec<u8> = ready.concat();
    let at = events as u32 as usize;
    let Some(dst) = at
        .checked_add(out.len())
        .and_then(|end| data.get_mut(at..end))
    else {
        return Ok(ERRNO_FAULT);
    };
    dst.copy_from_slice(&out);
    let at = nevents as u32 as usize;
    let Some(dst) = at.checked_add(4).and_then(|end| data.get_mut(at..end)) else {
        return Ok(ERRNO_FAULT);
    };
    dst.copy_from_slice(&(ready.len() as u32).to_le_bytes());
    Ok(ERRNO_SUCCESS)
}

/// An event: userdata, errno, type; `nbytes` and flags zero.
fn event(userdata: u64, errno: i32, kind: u8) -> [u8; EVENT_LEN] {
    let mut e = [0u8; EVENT_LEN];
    e[..8].copy_from_slice(&userdata.to_le_bytes());
    e[8..10].copy_from_slice(&(errno as u16).to_le_bytes());
    e[10] = kind;
    e
}
