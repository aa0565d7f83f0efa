//! Large state, few hot pages: 256 MiB of counters, of which each record touches one in a
//! hot set of 64 pages (and every 500th record one cold page anywhere). It shows what a
//! checkpoint of a big guest costs when little of it changes: the hashing of all of it.
//!
//! State: a 256 MiB `Vec<u64>` on the heap, filled with a non-zero pattern at `init` so no
//! page of it is free to store, plus a record count. Emits `<slot> <value>` per record.

use std::cell::RefCell;

#[link(wasm_import_module = "wasnap")]
unsafe extern "C" {
    fn emit(ptr: *const u8, len: usize);
}

const STATE_BYTES: usize = 256 << 20;
const SLOTS: usize = STATE_BYTES / 8;
const SLOTS_PER_PAGE: usize = 65536 / 8;
const HOT_PAGES: usize = 64;

#[derive(Default)]
struct State {
    input: Vec<u8>,
    slots: Vec<u64>,
    records: u64,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

#[unsafe(no_mangle)]
pub extern "C" fn init() {
    STATE.with_borrow_mut(|s| {
        s.slots = (0..SLOTS as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1).collect();
    });
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
        s.records += 1;
        let h = fnv(&s.input[..len]);
        // Hot pages are spread over the whole state, one every SLOTS / HOT_PAGES slots.
        let hot_page = (h % HOT_PAGES as u64) as usize * (SLOTS / HOT_PAGES / SLOTS_PER_PAGE);
        let slot = if s.records.is_multiple_of(500) {
            (h >> 8) as usize % SLOTS
        } else {
            hot_page * SLOTS_PER_PAGE + (h >> 32) as usize % SLOTS_PER_PAGE
        };
        s.slots[slot] = s.slots[slot].wrapping_add(h | 1);
        format!("{slot} {}", s.slots[slot])
    });
    unsafe { emit(line.as_ptr(), line.len()) }
}
