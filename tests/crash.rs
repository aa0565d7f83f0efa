//! Crash tests: a run killed with SIGKILL at random moments and restarted until done
//! must leave exactly the output of an uninterrupted run, byte for byte. Every guest
//! twice: with the default dirty tracking (`auto`: hashing for memories under 4 MiB, the
//! kernel above) and with the kernel's record of written pages.

mod common;

use common::*;

fn crash_test(guest_name: &str, records: usize, numbers: bool, every: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    crash_test_on(guest_name, records, numbers, every, store.to_str().unwrap());
}

fn crash_test_kernel(guest_name: &str, records: usize, numbers: bool, every: u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let extra = ["--dirty-tracking", "kernel"];
    crash_test_with(
        guest_name,
        records,
        numbers,
        every,
        store.to_str().unwrap(),
        &extra,
    );
}

mod kernel_tracking {
    use super::crash_test_kernel;

    #[test]
    fn rust_wordcount_survives_kill_9() {
        crash_test_kernel("wordcount", 150_000, false, 200);
    }

    #[test]
    fn rust_window_survives_kill_9() {
        crash_test_kernel("window", 150_000, true, 200);
    }

    #[test]
    fn wat_globals_guest_survives_kill_9() {
        crash_test_kernel("wat-globals", 150_000, false, 200);
    }

    #[test]
    fn c_sessions_guest_survives_kill_9() {
        crash_test_kernel("c-sessions", 150_000, false, 200);
    }

    #[test]
    fn assemblyscript_inventory_guest_survives_kill_9() {
        crash_test_kernel("as-inventory", 150_000, false, 200);
    }

    #[test]
    fn c_wordcount_guest_survives_kill_9() {
        crash_test_kernel("c-wordcount", 150_000, false, 200);
    }

    #[test]
    fn assemblyscript_wordcount_guest_survives_kill_9() {
        crash_test_kernel("as-wordcount", 150_000, false, 200);
    }

    #[test]
    fn bigstate_guest_survives_kill_9() {
        // 256 MiB, which auto mode gives the kernel anyway; fewer records per run fit
        // the kill window, since each process starts by restoring 256 MiB.
        crash_test_kernel("bigstate", 60_000, false, 500);
    }
}

#[test]
fn rust_wordcount_survives_kill_9() {
    crash_test("wordcount", 150_000, false, 200);
}

#[test]
fn rust_window_survives_kill_9() {
    crash_test("window", 150_000, true, 200);
}

#[test]
fn wat_globals_guest_survives_kill_9() {
    crash_test("wat-globals", 150_000, false, 200);
}

#[test]
fn c_sessions_guest_survives_kill_9() {
    crash_test("c-sessions", 150_000, false, 200);
}

#[test]
fn assemblyscript_inventory_guest_survives_kill_9() {
    crash_test("as-inventory", 150_000, false, 200);
}

#[test]
fn c_wordcount_guest_survives_kill_9() {
    crash_test("c-wordcount", 150_000, false, 200);
}

#[test]
fn assemblyscript_wordcount_guest_survives_kill_9() {
    crash_test("as-wordcount", 150_000, false, 200);
}
