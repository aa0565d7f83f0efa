//! SIGTERM and SIGINT ask a worker to stop cleanly (last checkpoints, leave the group)
//! instead of killing it.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    // Only an atomic store: nothing else is safe in a signal handler.
    STOP.store(true, Ordering::Relaxed);
}

/// The flag SIGTERM and SIGINT set (the handlers are installed on the first call).
pub fn stop_requested() -> &'static AtomicBool {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let handler = request_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGTERM, handler);
            libc::signal(libc::SIGINT, handler);
        }
    });
    &STOP
}
