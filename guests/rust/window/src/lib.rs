//! Sliding-window aggregator: a few MiB of state, rewritten in place.
//!
//! State: a ring buffer of the last 2^19 values (4 MiB of i64 on the heap), a histogram of
//! 2^16 buckets (256 KiB), running sums, and the stack pointer global. Every record
//! rewrites one ring slot and one histogram bucket, so each checkpoint dirties a few pages
//! of a large memory.
//!
//! A record is an integer (or, if it is not one, any text, hashed to a value). For each
//! record it emits the window's size, sum and mean, and how many values in the window
//! fall into the new value's bucket.

use std::cell::RefCell;

#[link(wasm_import_module = "wasnap")]
unsafe extern "C" {
    fn emit(ptr: *const u8, len: usize);
}

const WINDOW: usize = 1 << 19;
const BUCKETS: usize = 1 << 16;

struct State {
    input: Vec<u8>,
    ring: Vec<i64>,
    histogram: Vec<u32>,
    next: usize,
    filled: usize,
    sum: i128,
    seen: u64,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State {
        input: Vec::new(),
        ring: vec![0; WINDOW],
        histogram: vec![0; BUCKETS],
        next: 0,
        filled: 0,
        sum: 0,
        seen: 0,
    });
}

fn bucket(v: i64) -> usize {
    ((v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - 16)) as usize
}

fn value_of(record: &[u8]) -> i64 {
    match std::str::from_utf8(record).ok().and_then(|s| s.trim().parse::<i64>().ok()) {
        Some(v) => v,
        None => record.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)) as i64 >> 16,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn alloc(len: usize) -> *mut u8 {
    STATE.with_borrow_mut(|s| {
        s.input.resize(len, 0);
        s.input.as_mut_ptr()
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn process(_ptr: *const u8, len: usize) {
    let line = STATE.with_borrow_mut(|s| {
        let v = value_of(&s.input[..len]);
        if s.filled == WINDOW {
            let old = s.ring[s.next];
            s.sum -= old as i128;
            s.histogram[bucket(old)] -= 1;
        } else {
            s.filled += 1;
        }
        s.ring[s.next] = v;
        s.next = (s.next + 1) % WINDOW;
        s.sum += v as i128;
        s.histogram[bucket(v)] += 1;
        s.seen += 1;
        format!(
            "{} n={} sum={} mean={} same_bucket={}",
            s.seen,
            s.filled,
            s.sum,
            s.sum / s.filled as i128,
            s.histogram[bucket(v)]
        )
    });
    unsafe { emit(line.as_ptr(), line.len()) }
}
