//! The record ABI a guest must follow, checked before the first call so that a wrong
//! guest fails with a sentence naming what is wrong rather than a trap deep in a run.
//!
//! - import `wasnap.emit(ptr: i32, len: i32)`: one output record (optional: a guest may
//!   emit nothing);
//! - export `alloc(len: i32) -> i32`: where the host writes the next record;
//! - export `process(ptr: i32, len: i32)`: handle one record;
//! - export `memory`: the 32-bit memory `alloc`, `process` and `emit` pointers refer to;
//! - optional exports `_initialize()` (WASI reactors) and `init()`, called in that order
//!   on a fresh start and never after a restore;
//! - imports from `wasi_snapshot_preview1` are served by WASI preview 1.

use anyhow::{Result, bail};
use wasmtime::{ExternType, FuncType, Module, ValType};

pub const EMIT_MODULE: &str = "wasnap";
pub const EMIT_NAME: &str = "emit";
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// Which optional parts of the ABI a guest has.
#[derive(Clone, Copy, Debug)]
pub struct Abi {
    pub has_initialize: bool,
    pub has_init: bool,
}

/// Check `module` against the ABI.
pub fn check(module: &Module) -> Result<Abi> {
    for import in module.imports() {
        match (import.module(), import.name(), import.ty()) {
            (EMIT_MODULE, EMIT_NAME, ExternType::Func(ty)) => expect_signature(
                &ty,
                "import wasnap.emit",
                &[ValType::I32, ValType::I32],
                &[],
            )?,
            (EMIT_MODULE, name, _) => bail!(
                "the guest imports `wasnap.{name}`; wasnap provides only `wasnap.emit(ptr: i32, len: i32)`"
            ),
            (WASI_MODULE, _, ExternType::Func(_)) => {}
            (module, name, _) => bail!(
                "the guest imports `{module}.{name}`, which wasnap does not provide \
                 (it provides `wasnap.emit` and WASI preview 1)"
            ),
        }
    }

    let export = |name: &str| module.get_export(name);
    let is_command = export("_start").is_some();
    // Every required export missing, named at once with what the module does export.
    let missing: Vec<String> = ["alloc", "process", "memory"]
        .into_iter()
        .filter(|name| export(name).is_none())
        .map(|name| format!("`{name}`"))
        .collect();
    if !missing.is_empty() && !is_command {
        // The guest's own exports, not those instrumentation added.
        let exports: Vec<String> = module
            .exports()
            .filter(|e| !e.name().starts_with(super::instrument::RESERVED_PREFIX))
            .map(|e| format!("`{}`", e.name()))
            .collect();
        bail!(
            "the guest does not export {}, which the wasnap record ABI requires (alloc(len: i32) -> i32, process(ptr: i32, len: i32), memory); it exports {}",
            missing.join(", "),
            if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            }
        );
    }
    let required_func = |name: &str, params: &[ValType], results: &[ValType]| -> Result<()> {
        match export(name) {
            Some(ExternType::Func(ty)) => {
                expect_signature(&ty, &format!("export `{name}`"), params, results)
            }
            Some(_) => bail!("the guest's export `{name}` is not a function"),
            None if is_command => bail!(
                "the guest does not export `{name}`: it looks like a WASI command (`_start`), \
                 not a wasnap record guest (run it with --stdio)"
            ),
            None => {
                bail!("the guest does not export `{name}`, which the wasnap record ABI requires")
            }
        }
    };
    required_func("alloc", &[ValType::I32], &[ValType::I32])?;
    required_func("process", &[ValType::I32, ValType::I32], &[])?;
    match export("memory") {
        Some(ExternType::Memory(ty)) if ty.is_64() => {
            bail!(
                "the guest's export `memory` is a 64-bit memory; the record ABI passes i32 pointers into it"
            )
        }
        Some(ExternType::Memory(_)) => {}
        Some(_) => bail!("the guest's export `memory` is not a memory"),
        None => bail!("the guest does not export `memory`, which the wasnap record ABI requires"),
    }
    let optional_func = |name: &str| -> Result<bool> {
        match export(name) {
            Some(ExternType::Func(ty)) => {
                expect_signature(&ty, &format!("export `{name}`"), &[], &[]).map(|_| true)
            }
            Some(_) => bail!("the guest's export `{name}` is not a function"),
            None => Ok(false),
        }
    };
    let abi = Abi {
        has_initialize: optional_func("_initialize")?,
        has_init: optional_func("init")?,
    };
    if is_command {
        // A command's `_start` runs its constructors and `main`: a record guest that needs
        // them would run without them, and nothing else would say why.
        tracing::warn!(
            "the guest exports `_start` beside the record ABI: wasnap calls `alloc` and \
             `process` and never `_start` (build it as a reactor, or run a WASI command with \
             --stdio)"
        );
    }
    Ok(abi)
}

fn expect_signature(
    ty: &FuncType,
    what: &str,
    params: &[ValType],
    results: &[ValType],
) -> Result<()> {
    let same = |got: &mut dyn ExactSizeIterator<Item = ValType>, want: &[ValType]| {
        got.len() == want.len() && got.zip(want).all(|(g, w)| ValType::eq(&g, w))
    };
    if !same(&mut ty.params(), params) || !same(&mut ty.results(), results) {
        bail!(
            "the guest's {what} has type {}, but the wasnap ABI requires {}",
            describe(ty.params(), ty.results()),
            describe(params.iter().cloned(), results.iter().cloned()),
        );
    }
    Ok(())
}

fn describe(
    params: impl Iterator<Item = ValType>,
    results: impl Iterator<Item = ValType>,
) -> String {
    let list = |it: &mut dyn Iterator<Item = ValType>| {
        it.map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
    };
    format!(
        "({}) -> ({})",
        list(&mut { params }),
        list(&mut { results })
    )
}
