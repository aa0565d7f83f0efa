//! The `processor` world (wit/processor.wit) in Rust: word counts kept twice, once in the
//! guest's own memory (`counts`) and once in the host's kv store (`get-state`/`put-state`),
//! plus a record counter. The Python and JavaScript guests beside this one implement the
//! same logic byte for byte; guests/components/README.md is the specification.

use std::cell::RefCell;
use std::collections::BTreeMap;

wit_bindgen::generate!({
    path: "../../../wit/processor.wit",
    world: "processor",
});

use functionstream::core::collector;
use functionstream::core::kv::Store;

#[derive(Default)]
struct State {
    records: u64,
    // BTreeMap, not HashMap: no random hash keys, so no WASI randomness is needed.
    counts: BTreeMap<String, u64>,
    // Opened once in fs-init and kept: a host handle that must survive a checkpoint.
    store: Option<Store>,
    // Its name, for `#reopen`.
    name: String,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// The ASCII whitespace of the spec: space, \t, \n, \r, \f and \v. (Rust's own
/// `is_ascii_whitespace` leaves out \v, Python's `str.split()` takes Unicode spaces too.)
fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c' | '\x0b')
}

/// Non-empty runs of ASCII digits only (no sign, no spaces, no `_`), as a u64.
fn parse_digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// `#watermark N` after trimming: the one space, then digits that fit a u64.
fn watermark(text: &str) -> Option<u64> {
    parse_digits(
        text.trim_matches(is_ws)
            .strip_prefix("#watermark ")?
            .as_bytes(),
    )
}

/// A kv value as a count: ASCII decimal; absent, malformed or u64::MAX (no room for +1) is 0.
fn stored_count(v: Option<Vec<u8>>) -> u64 {
    match v.as_deref().and_then(parse_digits) {
        Some(n) if n < u64::MAX => n,
        _ => 0,
    }
}

fn progress(records: u64) {
    if records.is_multiple_of(1000) {
        eprintln!("progress {records}");
    }
}

struct Component;

impl Guest for Component {
    fn fs_init(config: Vec<(String, String)>) {
        let name = config
            .iter()
            .find(|(k, _)| k == "store")
            .map_or("counts", |(_, v)| v.as_str());
        // A second fs-init drops the handle it had first, as fs-close does.
        Self::fs_close();
        let store = Store::new(name);
        STATE.with_borrow_mut(|s| {
            s.store = Some(store);
            s.name = name.to_owned();
        });
        eprintln!("processor ready");
    }

    fn fs_process(_source_id: u32, data: Vec<u8>) {
        STATE.with_borrow_mut(|s| {
            s.records += 1;
            let text = String::from_utf8_lossy(&data);
            // Records of this guest only (not in the other languages), for wasnap's
            // tests: `#reopen` opens its store again and then drops the old handle (so
            // the handle table gets a free slot), `#trap` traps, `#to N TEXT` emits TEXT
            // to target N.
            if let Some((target, rest)) = text
                .strip_prefix("#to ")
                .and_then(|t| t.split_once(' '))
                .and_then(|(n, rest)| Some((n.parse::<u32>().ok()?, rest)))
            {
                collector::emit(target, rest.trim_end_matches(is_ws).as_bytes());
                collector::emit(0, format!("{}: to {target}", s.records).as_bytes());
                progress(s.records);
                return;
            }
            match text.trim_matches(is_ws) {
                "#reopen" => {
                    let again = Store::new(&s.name);
                    drop(s.store.replace(again));
                    collector::emit(0, format!("{}: reopened", s.records).as_bytes());
                    progress(s.records);
                    return;
                }
                "#trap" => panic!("record {} asked for a trap", s.records),
                _ => {}
            }
            if let Some(wm) = watermark(&text) {
                collector::emit_watermark(0, wm);
            } else {
                let mut out = format!("{}:", s.records);
                for word in text.split(is_ws).filter(|w| !w.is_empty()) {
                    let m = s.counts.entry(word.to_owned()).or_insert(0);
                    *m += 1;
                    let m = *m;
                    let store = s
                        .store
                        .as_ref()
                        .expect("fs-process: the kv store is closed");
                    let got = store.get_state(word.as_bytes()).expect("get-state failed");
                    let k = stored_count(got) + 1;
                    store
                        .put_state(word.as_bytes(), k.to_string().as_bytes())
                        .expect("put-state failed");
                    out.push_str(&format!(" {word}={m}/{k}"));
                }
                collector::emit(0, out.as_bytes());
            }
            progress(s.records);
        });
    }

    fn fs_process_watermark(_source_id: u32, watermark: u64) {
        collector::emit_watermark(0, watermark);
    }

    fn fs_take_checkpoint(_checkpoint_id: u64) {}

    fn fs_check_heartbeat() -> bool {
        true
    }

    fn fs_close() {
        // Dropping the handle drops the host resource.
        let store = STATE.with_borrow_mut(|s| s.store.take());
        drop(store);
    }

    fn fs_exec(_class_name: String, _payload: Vec<u8>) {}

    fn fs_custom(_payload: Vec<u8>) -> Vec<u8> {
        STATE.with_borrow(|s| s.records.to_string().into_bytes())
    }
}

export!(Component);
