//! Instrumentation: make every piece of a guest's state reachable from the host.
//!
//! wasmtime only lets the host touch exported items. A guest's state, though, lives in
//! its linear memories *and* in mutable globals that are usually not exported: C and Rust
//! keep `__stack_pointer` there, AssemblyScript keeps its allocator and GC roots there.
//! Like Wizer's `instrument.rs`, this pass rewrites **only the export section** so that
//! every defined memory and every defined mutable global gets an export under a reserved
//! name. Every other section is copied byte for byte, so function indices, code offsets
//! and names stay exactly what the guest's toolchain produced.
//!
//! Before:
//!
//! ```wat
//! (module
//!   (memory 1)
//!   (global $sp (mut i32) (i32.const 1024))
//!   (global $k i32 (i32.const 7))
//!   (func (export "process") ...))
//! ```
//!
//! After:
//!
//! ```wat
//! (module
//!   (memory 1)
//!   (global $sp (mut i32) (i32.const 1024))
//!   (global $k i32 (i32.const 7))               ;; immutable: never state, not exported
//!   (func (export "process") ...)
//!   (export "__wasnap_memory_0" (memory 0))
//!   (export "__wasnap_global_0" (global $sp)))
//! ```
//!
//! The same pass refuses what a memory + globals snapshot cannot restore faithfully:
//! imported memories or globals (their state lives outside the guest), mutable globals
//! of reference type, shared memories, and code that mutates tables (a funcref has no
//! stable identity to write down). Refusing is better than restoring a guest wrongly.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use wasm_encoder::Encode;
use wasmparser::{ExternalKind, Operator, Parser, Payload, TypeRef, ValType};

use crate::state::GlobalKind;

/// Every export the engine adds starts with this; a guest that already uses it is refused.
pub const RESERVED_PREFIX: &str = "__wasnap_";

/// Export name under which the host reaches the guest's `index`-th defined memory.
pub fn memory_export_name(index: u32) -> String {
    format!("{RESERVED_PREFIX}memory_{index}")
}

/// Export name under which the host reaches the guest's `index`-th defined global.
pub fn global_export_name(index: u32) -> String {
    format!("{RESERVED_PREFIX}global_{index}")
}

/// One piece of state the instrumented module exposes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateExport {
    /// Index in the module's global or memory index space.
    pub index: u32,
    /// The reserved export name the host uses to reach it.
    pub export_name: String,
}

/// A module whose state is fully exported, and what that state is.
#[derive(Clone, Debug)]
pub struct Instrumented {
    /// The rewritten module.
    pub wasm: Vec<u8>,
    /// SHA-256 of the module as the user gave it: binds checkpoints to their guest.
    pub original_sha256: [u8; 32],
    /// Every defined memory, in index order.
    pub memories: Vec<StateExport>,
    /// The type of each memory of `memories`.
    pub memory_types: Vec<wasm_encoder::MemoryType>,
    /// Every defined mutable global, in index order, with its type.
    pub globals: Vec<(StateExport, GlobalKind)>,
}

/// Rewrite `wasm` so every defined memory and mutable global is exported.
pub fn instrument(wasm: &[u8]) -> Result<Instrumented> {
    check_is_core_module(wasm)?;
    instrument_with(wasm, Imports::Refused)
}

/// [`instrument`] for a core module inside a component, whose imported memories, globals
/// and tables are defined by another module of the same component (whose own
/// instrumentation exports them).
pub fn instrument_in_component(wasm: &[u8]) -> Result<Instrumented> {
    instrument_with(wasm, Imports::FromComponent)
}

/// Whether a module may import state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Imports {
    /// A guest on its own: imported state would live outside the snapshot.
    Refused,
    /// A module of a component: its imports are another module's exports.
    FromComponent,
}

fn instrument_with(wasm: &[u8], imports: Imports) -> Result<Instrumented> {
    let original_sha256: [u8; 32] = Sha256::digest(wasm).into();

    let mut memories = Vec::new();
    let mut memory_types = Vec::new();
    let mut globals = Vec::new();
    let mut memory_count = 0u32;
    let mut global_count = 0u32;
    let mut export_section: Option<std::ops::Range<usize>> = None;
    // (section id, byte range of its contents) in module order.
    let mut sections: Vec<(u8, std::ops::Range<usize>)> = Vec::new();
    let mut segments = SegmentUse::default();

    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.context("the guest is not a valid WebAssembly module")?;
        match &payload {
            Payload::ImportSection(reader) => {
                for import in reader.clone().into_imports() {
                    let import = import.context("malformed import section")?;
                    // Imported items come first in their index spaces.
                    match import.ty {
                        TypeRef::Memory(_) => memory_count += 1,
                        TypeRef::Global(_) => global_count += 1,
                        _ => {}
                    }
                    if imports == Imports::FromComponent {
                        continue;
                    }
                    match import.ty {
                        TypeRef::Memory(_) => bail!(
                            "the guest imports a memory ({}.{}); wasnap can only snapshot memories the guest defines",
                            import.module,
                            import.name
                        ),
                        TypeRef::Global(_) => bail!(
                            "the guest imports a global ({}.{}); wasnap can only snapshot globals the guest defines",
                            import.module,
                            import.name
                        ),
                        TypeRef::Table(_) => bail!(
                            "the guest imports a table ({}.{}); wasnap provides none and cannot snapshot one",
                            import.module,
                            import.name
                        ),
                        _ => {}
                    }
                }
            }
            Payload::MemorySection(reader) => {
                for memory in reader.clone() {
                    let memory = memory.context("malformed memory section")?;
                    if memory.shared {
                        bail!(
                            "the guest defines a shared memory (memory {memory_count}); wasnap does not snapshot threaded guests"
                        );
                    }
                    memories.push(StateExport {
                        index: memory_count,
                        export_name: memory_export_name(memory_count),
                    });
                    memory_types.push(wasm_encoder::MemoryType {
                        minimum: memory.initial,
                        maximum: memory.maximum,
                        memory64: memory.memory64,
                        shared: false,
                        page_size_log2: memory.page_size_log2,
                    });
                    memory_count += 1;
                }
            }
            Payload::GlobalSection(reader) => {
                for global in reader.clone() {
                    let global = global.context("malformed global section")?;
                    let index = global_count;
                    global_count += 1;
                    if !global.ty.mutable {
                        continue; // an immutable global is part of the module, not of the state
                    }
                    let kind = match global.ty.content_type {
                        ValType::I32 => GlobalKind::I32,
                        ValType::I64 => GlobalKind::I64,
                        ValType::F32 => GlobalKind::F32,
                        ValType::F64 => GlobalKind::F64,
                        ValType::V128 => GlobalKind::V128,
                        ValType::Ref(_) => bail!(
                            "the guest has a mutable reference-typed global (global {index}); a reference has no stable identity to snapshot"
                        ),
                    };
                    globals.push((
                        StateExport {
                            index,
                            export_name: global_export_name(index),
                        },
                        kind,
                    ));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader.clone() {
                    let export = export.context("malformed export section")?;
                    if export.name.starts_with(RESERVED_PREFIX) {
                        bail!(
                            "the guest already exports `{}`; names starting with `{RESERVED_PREFIX}` are reserved for wasnap",
                            export.name
                        );
                    }
                }
            }
            Payload::CodeSectionEntry(body) => check_body(body, &mut segments)?,
            _ => {}
        }
        if let Some((id, range)) = payload.as_section() {
            if id == wasm_encoder::SectionId::Export as u8 {
                export_section = Some(range.clone());
            }
            sections.push((id, range));
        }
    }

    segments.check()?;
    let added: Vec<(String, ExternalKind, u32)> = memories
        .iter()
        .map(|m| (m.export_name.clone(), ExternalKind::Memory, m.index))
        .chain(
            globals
                .iter()
                .map(|(g, _)| (g.export_name.clone(), ExternalKind::Global, g.index)),
        )
        .collect();
    let new_exports = extend_export_section(export_section.map(|r| &wasm[r]), &added)?;

    let mut module = wasm_encoder::Module::new();
    let mut exports_written = false;
    for (id, range) in &sections {
        if *id == wasm_encoder::SectionId::Export as u8 {
            module.section(&wasm_encoder::RawSection {
                id: *id,
                data: &new_exports,
            });
            exports_written = true;
            continue;
        }
        if !exports_written && comes_after_exports(*id) {
            module.section(&wasm_encoder::RawSection {
                id: wasm_encoder::SectionId::Export as u8,
                data: &new_exports,
            });
            exports_written = true;
        }
        module.section(&wasm_encoder::RawSection {
            id: *id,
            data: &wasm[range.clone()],
        });
    }
    if !exports_written {
        module.section(&wasm_encoder::RawSection {
            id: wasm_encoder::SectionId::Export as u8,
            data: &new_exports,
        });
    }

    Ok(Instrumented {
        wasm: module.finish(),
        original_sha256,
        memories,
        memory_types,
        globals,
    })
}

/// A clear error for the two most common wrong inputs: not wasm at all, or a component.
pub fn check_is_core_module(wasm: &[u8]) -> Result<()> {
    if wasm.len() < 8 || &wasm[0..4] != b"\0asm" {
        bail!("not a WebAssembly module (the file does not start with the `\\0asm` magic)");
    }
    if wasm[4..8] != [1, 0, 0, 0] {
        bail!("a WebAssembly component or unknown binary version; wasnap runs core modules");
    }
    Ok(())
}

/// Sections the spec orders after the export section (start, element, data count, code, data).
/// Custom sections (id 0) may stand anywhere and are never a reason to emit exports early.
fn comes_after_exports(id: u8) -> bool {
    use wasm_encoder::SectionId as S;
    [S::Start, S::Element, S::DataCount, S::Code, S::Data]
        .iter()
        .any(|s| *s as u8 == id)
}

/// The export section's contents with `added` appended. The original entries are kept
/// byte for byte (so export kinds this crate does not know survive); only the count changes.
fn extend_export_section(
    original: Option<&[u8]>,
    added: &[(String, ExternalKind, u32)],
) -> Result<Vec<u8>> {
    let (count, entries) = match original {
        Some(data) => {
            let mut reader = wasmparser::BinaryReader::new(data, 0);
            let count = reader.read_var_u32().context("malformed export section")?;
            (count, &data[reader.original_position()..])
        }
        None => (0, &[][..]),
    };
    let mut out = Vec::with_capacity(entries.len() + added.len() * 24);
    (count + added.len() as u32).encode(&mut out);
    out.extend_from_slice(entries);
    for (name, kind, index) in added {
        name.as_str().encode(&mut out);
        out.push(match kind {
            ExternalKind::Memory => wasm_encoder::ExportKind::Memory as u8,
            ExternalKind::Global => wasm_encoder::ExportKind::Global as u8,
            _ => unreachable!("instrumentation only exports memories and globals"),
        });
        index.encode(&mut out);
    }
    Ok(out)
}

/// Where the code drops a passive data segment and where it copies one into memory.
/// Which segments were dropped is engine state a checkpoint cannot capture: a restored
/// guest would find a dropped segment live again. Only the two together make that
/// visible (a `memory.init` of a dropped segment traps), so only the two are refused.
#[derive(Default)]
struct SegmentUse {
    data_drop: Option<usize>,
    memory_init: Option<usize>,
}

impl SegmentUse {
    fn check(&self) -> Result<()> {
        if let (Some(drop), Some(init)) = (self.data_drop, self.memory_init) {
            bail!(
                "the guest drops passive data segments (data.drop at byte offset {drop:#x}) and \
                 copies them into memory (memory.init at {init:#x}); wasnap cannot snapshot \
                 which segments were dropped"
            );
        }
        Ok(())
    }
}

/// Refuse code that mutates a table (a funcref written at run time cannot be written
/// down), and note its use of passive data segments.
fn check_body(body: &wasmparser::FunctionBody<'_>, segments: &mut SegmentUse) -> Result<()> {
    let mut ops = body
        .get_operators_reader()
        .context("malformed function body")?;
    while !ops.eof() {
        let at = ops.original_position();
        let op = ops.read().context("malformed function body")?;
        let name = match op {
            Operator::DataDrop { .. } => {
                segments.data_drop.get_or_insert(at);
                continue;
            }
            Operator::MemoryInit { .. } => {
                segments.memory_init.get_or_insert(at);
                continue;
            }
            Operator::TableSet { .. } => "table.set",
            Operator::TableGrow { .. } => "table.grow",
            Operator::TableFill { .. } => "table.fill",
            Operator::TableCopy { .. } => "table.copy",
            Operator::TableInit { .. } => "table.init",
            _ => continue,
        };
        bail!(
            "the guest mutates a table ({name} at byte offset {:#x}); wasnap cannot snapshot table contents faithfully",
            ops.original_position()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(wasm: &[u8]) -> Vec<(u8, Vec<u8>)> {
        Parser::new(0)
            .parse_all(wasm)
            .filter_map(|p| p.unwrap().as_section())
            .map(|(id, r)| (id, wasm[r].to_vec()))
            .collect()
    }

    fn exports(wasm: &[u8]) -> Vec<(String, ExternalKind, u32)> {
        let mut out = Vec::new();
        for p in Parser::new(0).parse_all(wasm) {
            if let Payload::ExportSection(r) = p.unwrap() {
                for e in r {
                    let e = e.unwrap();
                    out.push((e.name.to_string(), e.kind, e.index));
                }
            }
        }
        out
    }

    const GUEST: &str = r#"(module
        (import "wasnap" "emit" (func (param i32 i32)))
        (memory 1)
        (global $sp (mut i32) (i32.const 1024))
        (global $k i32 (i32.const 7))
        (global $f (mut f64) (f64.const 1.5))
        (func (export "process") (param i32 i32) global.get $sp drop)
        (data (i32.const 0) "hi"))"#;

    #[test]
    fn exports_non_exported_mutable_globals_and_memories_only() {
        let wasm = wat::parse_str(GUEST).unwrap();
        let out = instrument(&wasm).unwrap();
        assert_eq!(
            exports(&out.wasm),
            vec![
                ("process".to_string(), ExternalKind::Func, 1),
                ("__wasnap_memory_0".to_string(), ExternalKind::Memory, 0),
                ("__wasnap_global_0".to_string(), ExternalKind::Global, 0),
                ("__wasnap_global_2".to_string(), ExternalKind::Global, 2),
            ]
        );
        assert_eq!(out.globals.len(), 2);
        assert_eq!(out.globals[1].1, GlobalKind::F64);
        wasmparser::validate(&out.wasm).unwrap();
    }

    #[test]
    fn every_other_section_is_copied_byte_for_byte() {
        let wasm = wat::parse_str(GUEST).unwrap();
        let out = instrument(&wasm).unwrap();
        let before: Vec<_> = sections(&wasm)
            .into_iter()
            .filter(|(id, _)| *id != 7)
            .collect();
        let after: Vec<_> = sections(&out.wasm)
            .into_iter()
            .filter(|(id, _)| *id != 7)
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn adds_an_export_section_in_the_right_place_when_there_is_none() {
        let wasm = wat::parse_str(
            r#"(module (memory 1) (global (mut i64) (i64.const 0)) (func) (start 0) (data (i32.const 0) "x"))"#,
        )
        .unwrap();
        let out = instrument(&wasm).unwrap();
        wasmparser::validate(&out.wasm).unwrap();
        let ids: Vec<u8> = sections(&out.wasm).iter().map(|(id, _)| *id).collect();
        let export_at = ids.iter().position(|id| *id == 7).unwrap();
        let start_at = ids.iter().position(|id| *id == 8).unwrap();
        assert!(
            export_at < start_at,
            "export section must precede start: {ids:?}"
        );
        assert_eq!(exports(&out.wasm).len(), 2);
    }

    #[test]
    fn the_sha256_is_of_the_original_module() {
        let wasm = wat::parse_str(GUEST).unwrap();
        let out = instrument(&wasm).unwrap();
        assert_eq!(out.original_sha256, <[u8; 32]>::from(Sha256::digest(&wasm)));
    }

    fn refusal(wat_src: &str) -> String {
        let wasm = wat::parse_str(wat_src).unwrap();
        format!("{:#}", instrument(&wasm).unwrap_err())
    }

    #[test]
    fn refuses_what_it_cannot_snapshot() {
        assert!(
            refusal(
                r#"(module (memory 1) (data $d "ab")
                    (func (memory.init $d (i32.const 0) (i32.const 0) (i32.const 2)))
                    (func (data.drop $d)))"#
            )
            .contains("data.drop at byte offset")
        );
        assert!(refusal(r#"(module (import "env" "m" (memory 1)))"#).contains("imports a memory"));
        assert!(
            refusal(r#"(module (import "env" "g" (global (mut i32))))"#)
                .contains("imports a global")
        );
        assert!(refusal(r#"(module (memory 1 1 shared))"#).contains("shared memory"));
        assert!(
            refusal(r#"(module (global (mut funcref) (ref.null func)))"#)
                .contains("reference-typed global")
        );
        assert!(
            refusal(r#"(module (global (export "__wasnap_x") i32 (i32.const 0)))"#)
                .contains("reserved")
        );
        assert!(
            refusal(r#"(module (table 1 funcref) (func (drop (table.grow (ref.null func) (i32.const 1)))))"#)
                .contains("table.grow")
        );
        assert!(
            refusal(
                r#"(module (table 2 funcref) (func (table.set (i32.const 0) (ref.null func))))"#
            )
            .contains("table.set")
        );
    }

    #[test]
    fn refuses_files_that_are_not_core_modules() {
        assert!(
            format!("{:#}", instrument(b"hello world, not wasm").unwrap_err())
                .contains("not a WebAssembly module")
        );
        assert!(
            format!("{:#}", instrument(b"\0asm\x0d\0\x01\0").unwrap_err()).contains("component")
        );
        let truncated = &wat::parse_str(GUEST).unwrap()[..30];
        assert!(
            format!("{:#}", instrument(truncated).unwrap_err())
                .contains("not a valid WebAssembly module")
        );
    }
}
