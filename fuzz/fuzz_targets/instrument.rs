//! `guest::instrument::instrument` on arbitrary bytes and on modules `wasm-smith`
//! generates from them. Never a panic, a hang or an unbounded allocation; and for a
//! valid module it accepts, the output must be what the pass promises:
//!
//! - a valid module (under the same features as the input);
//! - every section but the export section copied byte for byte, in order;
//! - the original exports kept, plus one per defined memory and mutable global, under
//!   the reserved names, with the right kind and index;
//! - refused if instrumented again (it now exports reserved names), unless it added none.
//!
//! Inputs that start with the wasm magic are taken as modules only (the corpus is
//! seeded with the example guests); others also drive wasm-smith.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use wasmparser::{ExternalKind, Parser, Payload, Validator, WasmFeatures};
use wasnap::guest::instrument::{
    RESERVED_PREFIX, global_export_name, instrument, memory_export_name,
};

fn valid(wasm: &[u8]) -> bool {
    Validator::new_with_features(WasmFeatures::all())
        .validate_all(wasm)
        .is_ok()
}

/// Every section but exports (id 7), as (id, contents).
fn other_sections(wasm: &[u8]) -> Vec<(u8, &[u8])> {
    Parser::new(0)
        .parse_all(wasm)
        .filter_map(|p| p.expect("parses").as_section())
        .filter(|(id, _)| *id != 7)
        .map(|(id, r)| (id, &wasm[r]))
        .collect()
}

fn exports(wasm: &[u8]) -> Vec<(String, ExternalKind, u32)> {
    let mut out = Vec::new();
    for p in Parser::new(0).parse_all(wasm) {
        if let Payload::ExportSection(r) = p.expect("parses") {
            for e in r {
                let e = e.expect("export parses");
                out.push((e.name.to_string(), e.kind, e.index));
            }
        }
    }
    out
}

fn check(wasm: &[u8]) {
    let Ok(out) = instrument(wasm) else {
        return;
    };
    if !valid(wasm) {
        return; // garbage accepted is garbage out: only a panic would be a bug
    }
    assert!(
        valid(&out.wasm),
        "instrumenting a valid module made an invalid one"
    );
    assert_eq!(
        other_sections(wasm),
        other_sections(&out.wasm),
        "a section other than exports changed"
    );
    let mut expected = exports(wasm);
    for m in &out.memories {
        assert_eq!(m.export_name, memory_export_name(m.index));
        expected.push((m.export_name.clone(), ExternalKind::Memory, m.index));
    }
    for (g, _) in &out.globals {
        assert_eq!(g.export_name, global_export_name(g.index));
        expected.push((g.export_name.clone(), ExternalKind::Global, g.index));
    }
    assert_eq!(
        exports(&out.wasm),
        expected,
        "exports are not the original plus the state"
    );
    assert!(
        out.memories
            .iter()
            .map(|m| m.index)
            .eq(0..out.memories.len() as u32),
        "memories are not every defined memory in order"
    );
    let added = out.memories.len() + out.globals.len();
    if added > 0 {
        let again = instrument(&out.wasm);
        assert!(
            again
                .as_ref()
                .is_err_and(|e| format!("{e:#}").contains(RESERVED_PREFIX)),
            "an instrumented module was instrumented again: {:?}",
            again.err()
        );
    }
}

fn smith(data: &[u8]) -> arbitrary::Result<Vec<u8>> {
    let mut u = Unstructured::new(data);
    let mut config = wasm_smith::Config::arbitrary(&mut u)?;
    if u.arbitrary()? {
        // Mostly modules wasnap accepts: no imports (of memories or globals), no
        // shared memories.
        config.max_imports = 0;
        config.threads_enabled = false;
    }
    config.generate_custom_sections = u.arbitrary()?;
    Ok(wasm_smith::Module::new(config, &mut u)?.to_bytes())
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if !data.starts_with(b"\0asm")
        && let Ok(wasm) = smith(data)
    {
        check(&wasm);
    }
});
