//! Word count: a `HashMap<String, u64>` that grows with the vocabulary.
//!
//! State: the map and its `String` keys on the heap (Rust's allocator, in linear memory),
//! the map's random hash keys (drawn from WASI `random_get` on first use), and the stack
//! pointer (a non-exported mutable global). Knows nothing about checkpoints.
//!
//! For each record, emits `<word> <count so far>` for every whitespace-separated word;
//! every 500th record also emits the vocabulary size and the most frequent word.

use std::cell::RefCell;
use std::collections::HashMap;

#[link(wasm_import_module = "wasnap")]
unsafe extern "C" {
    fn emit(ptr: *const u8, len: usize);
}

fn emit_str(s: &str) {
    unsafe { emit(s.as_ptr(), s.len()) }
}

#[derive(Default)]
struct State {
    input: Vec<u8>,
    counts: HashMap<String, u64>,
    records: u64,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
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
    STATE.with_borrow_mut(|s| {
        let State { input, counts, records } = s;
        *records += 1;
        let text = String::from_utf8_lossy(&input[..len]);
        let mut line = String::new();
        for word in text.split_whitespace() {
            let word = word.to_lowercase();
            let count = counts.entry(word.clone()).or_insert(0);
            *count += 1;
            line.clear();
            line.push_str(&word);
            line.push(' ');
            line.push_str(&count.to_string());
            emit_str(&line);
        }
        if *records % 500 == 0 {
            // Ties broken by the word, so the answer does not depend on hash order.
            let top = counts.iter().max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)));
            if let Some((word, count)) = top {
                emit_str(&format!("# records={records} vocabulary={} top={word}:{count}", counts.len()));
            }
        }
    })
}
