//! Instrumentation of a component: every core module's state made reachable, and an
//! accessor the host calls to read and write it.
//!
//! Like Wizer's `component/instrument.rs`: each core module's export section is rewritten
//! by the core instrumentation (`guest::instrument`) to export its defined memories and
//! mutable globals under reserved names; every other section is copied byte for byte.
//! Then an accessor core module is appended, instantiated with the guest's core instances
//! as its imports, and its functions are lifted into one component instance exported as
//! [`ACCESS_EXPORT`]:
//!
//! ```wat
//! (module $accessor
//!   (import "3" "__wasnap_memory_0" (memory 17))       ;; every defined memory
//!   (import "3" "__wasnap_global_0" (global (mut i32))) ;; every defined mutable global
//!   (import "drops" "drop" (func (param i32)))          ;; canon resource.drop of a filler type
//!   (memory $own 1)                                     ;; the accessor's scratch, never the guest's
//!   (func (export "get-all") (result i32) ...)          ;; every global as a u64, to $own
//!   (func (export "set-all") (param i32 i32) ...)       ;; and back
//!   (func (export "realloc") (param i32 i32 i32 i32) (result i32) ...)
//!   (func (export "grow0") (param i64) (result i64) ...) ;; memory.grow, per memory
//!   (func (export "adopt") (param i32) (result i32) local.get 0)
//!   (func (export "drop") (param i32) local.get 0 call 0))
//! ```
//!
//! lifted as `get-all: func() -> list<u64>`, `set-all: func(values: list<u64>)`,
//! `growN: func(pages: u64) -> s64`, `adoptK: func(handle: own<T>) -> u32` for each
//! resource type a restore may have to put back in the guest's handle table (the handle
//! lands in the table and the accessor returns its index), and `drop-filler: func(index:
//! u32)`. Two calls read or write every global, however many there are; the guest's own
//! memory is never touched by the accessor.
//!
//! What a snapshot of memories, globals and host handles cannot restore is refused here:
//! nested components, module imports and aliases, a module instantiated twice,
//! guest-defined resources, and the component model's async and thread built-ins.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use wasm_encoder::{
    Alias, CanonicalFunctionSection, CanonicalOption, CodeSection, ComponentAliasSection,
    ComponentExportKind, ComponentExportSection, ComponentInstanceSection, ComponentTypeSection,
    ComponentValType, EntityType, ExportKind, ExportSection, Function, FunctionSection, GlobalType,
    ImportSection, InstanceSection, MemArg, MemoryType, ModuleArg, PrimitiveValType, TypeSection,
    ValType as EncValType,
};
use wasmparser::{
    CanonicalFunction, ComponentAlias, ComponentExternalKind, ComponentOuterAliasKind,
    ComponentType, ComponentTypeRef, Instance, InstanceTypeDeclaration, Parser, Payload,
    TypeBounds,
};

use crate::guest::instrument::{Instrumented, instrument_in_component};
use crate::state::GlobalKind;

/// The component instance export through which the host reaches the accessor.
pub const ACCESS_EXPORT: &str = "wasnap:state/access";

/// A host resource type whose handles a restore can put back in the guest's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    KvStore,
    KvIterator,
    InputStream,
    OutputStream,
    Pollable,
}

impl ResourceKind {
    /// (interface name without version, resource name) as the component imports them.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            ResourceKind::KvStore => ("functionstream:core/kv", "store"),
            ResourceKind::KvIterator => ("functionstream:core/kv", "iterator"),
            ResourceKind::InputStream => ("wasi:io/streams", "input-stream"),
            ResourceKind::OutputStream => ("wasi:io/streams", "output-stream"),
            ResourceKind::Pollable => ("wasi:io/poll", "pollable"),
        }
    }

    /// In the order a filler type is chosen: the first the component imports.
    const ALL: [ResourceKind; 5] = [
        ResourceKind::KvStore,
        ResourceKind::KvIterator,
        ResourceKind::InputStream,
        ResourceKind::OutputStream,
        ResourceKind::Pollable,
    ];
}

/// A memory of one of the guest's core instances, in allocation order.
#[derive(Clone, Debug)]
pub struct MemoryInfo {
    pub is_64: bool,
    /// Its initial size in pages: with `is_64`, what identifies it among the memories
    /// the engine allocates.
    pub minimum: u64,
    /// The export the accessor grows it by.
    pub grow_export: String,
}

/// What the instrumented component exposes, and the component itself.
pub struct InstrumentedComponent {
    pub wasm: Vec<u8>,
    /// SHA-256 of the component as the user gave it.
    pub original_sha256: [u8; 32],
    /// Every defined memory of the guest, in the order wasmtime allocates them.
    pub memories: Vec<MemoryInfo>,
    /// Every defined mutable global, in `get-all`'s order.
    pub globals: Vec<GlobalKind>,
    /// The resource types the accessor can adopt, with their export names.
    pub adopters: Vec<(ResourceKind, String)>,
    /// The type fillers are made of, if any type can be adopted.
    pub filler: Option<ResourceKind>,
}

/// Index spaces of the component's top level, counted as the sections go by: where the
/// accessor's additions will land.
#[derive(Default, Debug)]
struct Counts {
    types: u32,
    funcs: u32,
    instances: u32,
    core_funcs: u32,
    core_memories: u32,
    core_instances: u32,
    core_modules: u32,
}

impl Counts {
    fn add(&mut self, kind: ComponentExternalKind, what: &str) -> Result<()> {
        match kind {
            ComponentExternalKind::Func => self.funcs += 1,
            ComponentExternalKind::Type => self.types += 1,
            ComponentExternalKind::Instance => self.instances += 1,
            ComponentExternalKind::Module => {
                bail!("the component has module {what}; wasnap refuses them")
            }
            ComponentExternalKind::Component => {
                bail!("the component has component {what}; wasnap refuses them")
            }
            ComponentExternalKind::Value => {
                bail!("the component has value {what}; wasnap refuses them")
            }
        }
        Ok(())
    }
}

/// Instrument a component (see the module docs).
pub fn instrument(wasm: &[u8]) -> Result<InstrumentedComponent> {
    let original_sha256: [u8; 32] = Sha256::digest(wasm).into();
    let mut counts = Counts::default();
    let mut out = wasm_encoder::Component::new();
    let mut modules: Vec<Instrumented> = Vec::new();
    // (core instance, module) in instantiation order.
    let mut instantiations: Vec<(u32, u32)> = Vec::new();
    // Component type index -> the resource names an instance type exports.
    let mut instance_types: std::collections::HashMap<u32, Vec<String>> = Default::default();
    // (component instance index, interface name without version, resource names).
    let mut imported_instances: Vec<(u32, String, Vec<String>)> = Vec::new();
    let mut in_module = false;
    // Inside a nested component (wit-component nests type-only ones for exported
    // interfaces): how deep. Its bytes are copied whole with its section.
    let mut nested = 0u32;

    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.context("the component is not valid WebAssembly")?;
        if nested > 0 {
            // Only type-only nested components (types, imports, exports) hold no state
            // and take no handles: anything else in one is refused.
            match payload {
                Payload::ComponentSection { .. } => nested += 1,
                Payload::End(_) => nested -= 1,
                Payload::Version { .. }
                | Payload::ComponentTypeSection(_)
                | Payload::ComponentImportSection(_)
                | Payload::ComponentExportSection(_)
                | Payload::CustomSection(_) => {}
                Payload::ModuleSection { .. } => {
                    bail!("the component nests a component with core modules; wasnap refuses those")
                }
                other => bail!(
                    "the component nests a component with more than types, imports and exports (a {} section); wasnap refuses those",
                    match other.as_section().map_or(0, |(id, _)| id) {
                        2 => "core instance",
                        3 => "core type",
                        5 => "component instance",
                        6 => "alias",
                        8 => "canonical function",
                        9 => "start",
                        _ => "further",
                    }
                ),
            }
            continue;
        }
        if in_module {
            // The payloads of a module section, already handed to the core instrumentation.
            if let Payload::End(_) = payload {
                in_module = false;
            }
            continue;
        }
        match &payload {
            Payload::Version { encoding, .. } if *encoding != wasmparser::Encoding::Component => {
                bail!("expected a component, found a core module");
            }
            Payload::ModuleSection {
                unchecked_range, ..
            } => {
                let module = &wasm[unchecked_range.clone()];
                let instrumented = instrument_in_component(module).with_context(|| {
                    format!("core module {} of the component", counts.core_modules)
                })?;
                out.section(&wasm_encoder::RawSection {
                    id: wasm_encoder::ComponentSectionId::CoreModule as u8,
                    data: &instrumented.wasm,
                });
                modules.push(instrumented);
                counts.core_modules += 1;
                in_module = true;
                continue;
            }
            Payload::ComponentSection {
                unchecked_range, ..
            } => {
                out.section(&wasm_encoder::RawSection {
                    id: wasm_encoder::ComponentSectionId::Component as u8,
                    data: &wasm[unchecked_range.clone()],
                });
                nested = 1;
                continue;
            }
            Payload::InstanceSection(reader) => {
                for instance in reader.clone() {
                    if let Instance::Instantiate { module_index, .. } = instance? {
                        if instantiations.iter().any(|(_, m)| *m == module_index) {
                            bail!(
                                "the component instantiates core module {module_index} twice; wasnap refuses that"
                            );
                        }
                        instantiations.push((counts.core_instances, module_index));
                    }
                    counts.core_instances += 1;
                }
            }
            Payload::ComponentInstanceSection(reader) => {
                counts.instances += reader.count();
            }
            Payload::ComponentAliasSection(reader) => {
                for alias in reader.clone() {
                    match alias? {
                        ComponentAlias::CoreInstanceExport { kind, .. } => match kind {
                            wasmparser::ExternalKind::Func
                            | wasmparser::ExternalKind::FuncExact => counts.core_funcs += 1,
                            wasmparser::ExternalKind::Memory => counts.core_memories += 1,
                            _ => {}
                        },
                        ComponentAlias::InstanceExport { kind, .. } => {
                            counts.add(kind, "aliases")?
                        }
                        ComponentAlias::Outer { kind, .. } => match kind {
                            ComponentOuterAliasKind::CoreType => {}
                            ComponentOuterAliasKind::Type => counts.types += 1,
                            ComponentOuterAliasKind::CoreModule
                            | ComponentOuterAliasKind::Component => {
                                bail!(
                                    "the component aliases an outer module or component; wasnap refuses that"
                                )
                            }
                        },
                    }
                }
            }
            Payload::ComponentCanonicalSection(reader) => {
                for function in reader.clone() {
                    match function? {
                        CanonicalFunction::Lift { options, .. } => {
                            refuse_async(&options)?;
                            counts.funcs += 1;
                        }
                        CanonicalFunction::Lower { options, .. } => {
                            refuse_async(&options)?;
                            counts.core_funcs += 1;
                        }
                        CanonicalFunction::ResourceDrop { .. } => counts.core_funcs += 1,
                        CanonicalFunction::ResourceNew { .. }
                        | CanonicalFunction::ResourceRep { .. } => {
                            bail!(
                                "the component defines a resource type of its own; wasnap cannot restore guest-defined resources"
                            )
                        }
                        other => bail!(
                            "the component uses the component model built-in {}; wasnap refuses async and thread built-ins",
                            builtin_name(&other)
                        ),
                    }
                }
            }
            Payload::ComponentTypeSection(reader) => {
                for ty in reader.clone() {
                    if let ComponentType::Instance(decls) = ty? {
                        let resources = decls
                            .iter()
                            .filter_map(|d| match d {
                                InstanceTypeDeclaration::Export {
                                    name,
                                    ty: ComponentTypeRef::Type(TypeBounds::SubResource),
                                } => Some(name.name.to_string()),
                                _ => None,
                            })
                            .collect();
                        instance_types.insert(counts.types, resources);
                    }
                    counts.types += 1;
                }
            }
            Payload::ComponentImportSection(reader) => {
                for import in reader.clone() {
                    let import = import?;
                    if let ComponentTypeRef::Instance(ty) = import.ty {
                        let name = import.name.name;
                        let interface = name.split('@').next().unwrap_or(name).to_string();
                        let resources = instance_types.get(&ty).cloned().unwrap_or_default();
                        imported_instances.push((counts.instances, interface, resources));
                    }
                    counts.add(import.ty.kind(), "imports")?;
                }
            }
            Payload::ComponentExportSection(reader) => {
                for export in reader.clone() {
                    let export = export?;
                    if export.name.name == ACCESS_EXPORT {
                        bail!(
                            "the component already exports `{ACCESS_EXPORT}`, a name wasnap reserves"
                        );
                    }
                    counts.add(export.kind, "exports")?;
                }
            }
            Payload::ComponentStartSection { .. } => {
                bail!(
                    "the component has a start function; wasnap refuses component start functions"
                )
            }
            _ => {}
        }
        if let Some((id, range)) = payload.as_section() {
            out.section(&wasm_encoder::RawSection {
                id,
                data: &wasm[range],
            });
        }
    }

    let adoptable: Vec<(ResourceKind, u32, &str)> = ResourceKind::ALL
        .iter()
        .filter_map(|kind| {
            let (interface, resource) = kind.names();
            imported_instances
                .iter()
                .find(|(_, name, resources)| {
                    name == interface && resources.iter().any(|r| r == resource)
                })
                .map(|(instance, _, _)| (*kind, *instance, resource))
        })
        .collect();

    Accessor::new(counts, &modules, &instantiations, &adoptable).finish(out, original_sha256)
}

fn refuse_async(options: &[wasmparser::CanonicalOption]) -> Result<()> {
    for option in options {
        if matches!(
            option,
            wasmparser::CanonicalOption::Async | wasmparser::CanonicalOption::Callback(_)
        ) {
            bail!(
                "the component lifts or lowers a function with the async ABI; wasnap refuses component-model async"
            );
        }
    }
    Ok(())
}

fn builtin_name(function: &CanonicalFunction) -> String {
    let debug = format!("{function:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_string()
}

/// The accessor module and the component items that lift it.
struct Accessor<'a> {
    counts: Counts,
    modules: &'a [Instrumented],
    instantiations: &'a [(u32, u32)],
    adoptable: &'a [(ResourceKind, u32, &'a str)],
}

/// Bytes of the accessor's scratch memory before the globals: the (pointer, length) pair
/// `get-all` returns, padded.
const SCRATCH_HEADER: u32 = 16;

impl Accessor<'_> {
    fn new<'a>(
        counts: Counts,
        modules: &'a [Instrumented],
        instantiations: &'a [(u32, u32)],
        adoptable: &'a [(ResourceKind, u32, &'a str)],
    ) -> Accessor<'a> {
        Accessor {
            counts,
            modules,
            instantiations,
            adoptable,
        }
    }

    fn finish(
        self,
        mut out: wasm_encoder::Component,
        original_sha256: [u8; 32],
    ) -> Result<InstrumentedComponent> {
        let c = &self.counts;
        // --- The accessor module. ---
        let mut types = TypeSection::new();
        let mut imports = ImportSection::new();
        let mut functions = FunctionSection::new();
        let mut code = CodeSection::new();
        let mut exports = ExportSection::new();
        let mut globals = Vec::new();
        let mut memories = Vec::new();
        let mut import_args: Vec<(String, u32)> = Vec::new();
        let mut imported_memories = 0u32;
        let mut imported_funcs = 0u32;
        for (core_instance, module_index) in self.instantiations {
            let module = self.modules.get(*module_index as usize).with_context(|| {
                format!("core instance {core_instance} instantiates a missing module")
            })?;
            let name = core_instance.to_string();
            for (memory, ty) in module.memories.iter().zip(&module.memory_types) {
                let ty = *ty;
                imports.import(&name, &memory.export_name, EntityType::Memory(ty));
                memories.push(MemoryInfo {
                    is_64: ty.memory64,
                    minimum: ty.minimum,
                    grow_export: format!("grow{}", memories.len()),
                });
                imported_memories += 1;
            }
            for (global, kind) in &module.globals {
                let val_type = match kind {
                    GlobalKind::I32 => EncValType::I32,
                    GlobalKind::I64 => EncValType::I64,
                    GlobalKind::F32 => EncValType::F32,
                    GlobalKind::F64 => EncValType::F64,
                    GlobalKind::V128 => bail!(
                        "core instance {core_instance} has a mutable v128 global; wasnap cannot reach it in a component"
                    ),
                };
                imports.import(
                    &name,
                    &global.export_name,
                    EntityType::Global(GlobalType {
                        val_type,
                        mutable: true,
                        shared: false,
                    }),
                );
                globals.push(*kind);
            }
            if !module.memories.is_empty() || !module.globals.is_empty() {
                import_args.push((name, *core_instance));
            }
        }
        // Types: 0 () -> i32, 1 (i32 i32) -> (), 2 (i32 i32 i32 i32) -> i32,
        // 3 (i64) -> i64, 4 (i32) -> i32, 5 (i32) -> ().
        types.ty().function([], [EncValType::I32]);
        types.ty().function([EncValType::I32, EncValType::I32], []);
        types.ty().function([EncValType::I32; 4], [EncValType::I32]);
        types.ty().function([EncValType::I64], [EncValType::I64]);
        types.ty().function([EncValType::I32], [EncValType::I32]);
        types.ty().function([EncValType::I32], []);
        let filler = self.adoptable.first().map(|(kind, ..)| *kind);
        if filler.is_some() {
            imports.import("drops", "drop", EntityType::Function(5));
            imported_funcs += 1;
        }
        let scratch = imported_memories; // the accessor's own memory
        let scratch_bytes = SCRATCH_HEADER as u64 + 8 * globals.len() as u64;
        let scratch_pages = scratch_bytes.div_ceil(65536).max(1);
        let mut memory_section = wasm_encoder::MemorySection::new();
        memory_section.memory(MemoryType {
            minimum: scratch_pages,
            maximum: Some(scratch_pages),
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        let mem = |offset: u64, align: u32| MemArg {
            offset,
            align,
            memory_index: scratch,
        };
        let mut next_func = imported_funcs;
        let mut export_func = |exports: &mut ExportSection, name: &str| {
            exports.export(name, ExportKind::Func, next_func);
            next_func += 1;
        };

        // get-all: every global as a u64 at SCRATCH_HEADER.., (ptr, len) at 0.
        functions.function(0);
        let mut f = Function::new([]);
        {
            let mut ins = f.instructions();
            for (k, kind) in globals.iter().enumerate() {
                ins.i32_const(0);
                ins.global_get(k as u32);
                match kind {
                    GlobalKind::I32 => {
                        ins.i64_extend_i32_u();
                    }
                    GlobalKind::I64 => {}
                    GlobalKind::F32 => {
                        ins.i32_reinterpret_f32();
                        ins.i64_extend_i32_u();
                    }
                    GlobalKind::F64 => {
                        ins.i64_reinterpret_f64();
                    }
                    GlobalKind::V128 => unreachable!("refused above"),
                }
                ins.i64_store(mem(SCRATCH_HEADER as u64 + 8 * k as u64, 3));
            }
            ins.i32_const(0);
            ins.i32_const(SCRATCH_HEADER as i32);
            ins.i32_store(mem(0, 2));
            ins.i32_const(0);
            ins.i32_const(globals.len() as i32);
            ins.i32_store(mem(4, 2));
            ins.i32_const(0);
            ins.end();
        }
        code.function(&f);
        export_func(&mut exports, "get-all");

        // set-all(ptr, len): the values the host wrote through `realloc`.
        functions.function(1);
        let mut f = Function::new([]);
        {
            let mut ins = f.instructions();
            ins.local_get(1);
            ins.i32_const(globals.len() as i32);
            ins.i32_ne();
            ins.if_(wasm_encoder::BlockType::Empty);
            ins.unreachable();
            ins.end();
            for (k, kind) in globals.iter().enumerate() {
                ins.local_get(0);
                ins.i64_load(mem(8 * k as u64, 3));
                match kind {
                    GlobalKind::I32 => {
                        ins.i32_wrap_i64();
                    }
                    GlobalKind::I64 => {}
                    GlobalKind::F32 => {
                        ins.i32_wrap_i64();
                        ins.f32_reinterpret_i32();
                    }
                    GlobalKind::F64 => {
                        ins.f64_reinterpret_i64();
                    }
                    GlobalKind::V128 => unreachable!("refused above"),
                }
                ins.global_set(k as u32);
            }
            ins.end();
        }
        code.function(&f);
        export_func(&mut exports, "set-all");

        // realloc: the one buffer set-all's argument may use.
        functions.function(2);
        let mut f = Function::new([]);
        {
            let mut ins = f.instructions();
            ins.local_get(3);
            ins.i32_const((scratch_pages * 65536 - SCRATCH_HEADER as u64) as i32);
            ins.i32_gt_u();
            ins.if_(wasm_encoder::BlockType::Empty);
            ins.unreachable();
            ins.end();
            ins.i32_const(SCRATCH_HEADER as i32);
            ins.end();
        }
        code.function(&f);
        export_func(&mut exports, "realloc");

        // growN(pages) -> old size in pages, or -1.
        for (n, memory) in memories.iter().enumerate() {
            functions.function(3);
            let mut f = Function::new([]);
            {
                let mut ins = f.instructions();
                ins.local_get(0);
                if !memory.is_64 {
                    ins.i32_wrap_i64();
                }
                ins.memory_grow(n as u32);
                if !memory.is_64 {
                    ins.i64_extend_i32_s();
                }
                ins.end();
            }
            code.function(&f);
            export_func(&mut exports, &memory.grow_export);
        }

        // adopt(handle) -> handle: lowering the `own` argument put it in the table.
        functions.function(4);
        let mut f = Function::new([]);
        {
            let mut ins = f.instructions();
            ins.local_get(0);
            ins.end();
        }
        code.function(&f);
        export_func(&mut exports, "adopt");

        if filler.is_some() {
            functions.function(5);
            let mut f = Function::new([]);
            {
                let mut ins = f.instructions();
                ins.local_get(0);
                ins.call(0);
                ins.end();
            }
            code.function(&f);
            export_func(&mut exports, "drop");
        }
        exports.export("memory", ExportKind::Memory, scratch);

        let mut module = wasm_encoder::Module::new();
        module.section(&types);
        module.section(&imports);
        module.section(&functions);
        module.section(&memory_section);
        module.section(&exports);
        module.section(&code);

        // --- The component items around it. ---
        let mut next_type = c.types;
        let mut next_core_func = c.core_funcs;
        let mut next_core_instance = c.core_instances;

        // Resource types of the imported instances, and `own` of each.
        let mut aliases = ComponentAliasSection::new();
        let mut resource_types = Vec::new();
        for (kind, instance, name) in self.adoptable {
            aliases.alias(Alias::InstanceExport {
                instance: *instance,
                kind: ComponentExportKind::Type,
                name,
            });
            resource_types.push((*kind, next_type));
            next_type += 1;
        }
        if !self.adoptable.is_empty() {
            out.section(&aliases);
        }
        let mut ctypes = ComponentTypeSection::new();
        let list_u64 = next_type;
        ctypes
            .defined_type()
            .list(ComponentValType::Primitive(PrimitiveValType::U64));
        next_type += 1;
        let get_all_type = next_type;
        ctypes
            .function()
            .params::<_, ComponentValType>([])
            .result(Some(ComponentValType::Type(list_u64)));
        next_type += 1;
        let set_all_type = next_type;
        ctypes
            .function()
            .params([("values", ComponentValType::Type(list_u64))])
            .result(None);
        next_type += 1;
        let grow_type = next_type;
        ctypes
            .function()
            .params([("pages", ComponentValType::Primitive(PrimitiveValType::U64))])
            .result(Some(ComponentValType::Primitive(PrimitiveValType::S64)));
        next_type += 1;
        let drop_type = next_type;
        ctypes
            .function()
            .params([("index", ComponentValType::Primitive(PrimitiveValType::U32))])
            .result(None);
        next_type += 1;
        let mut adopt_types = Vec::new();
        for (kind, resource) in &resource_types {
            let own = next_type;
            ctypes.defined_type().own(*resource);
            next_type += 1;
            ctypes
                .function()
                .params([("handle", ComponentValType::Type(own))])
                .result(Some(ComponentValType::Primitive(PrimitiveValType::U32)));
            adopt_types.push((*kind, next_type));
            next_type += 1;
        }
        out.section(&ctypes);

        // The filler type's `resource.drop`, as a core instance the accessor imports.
        let mut args: Vec<(String, ModuleArg)> = import_args
            .iter()
            .map(|(name, instance)| (name.clone(), ModuleArg::Instance(*instance)))
            .collect();
        if let Some((_, filler_type)) = resource_types.first() {
            let mut canon = CanonicalFunctionSection::new();
            canon.resource_drop(*filler_type);
            out.section(&canon);
            let drop_func = next_core_func;
            next_core_func += 1;
            let mut bag = InstanceSection::new();
            bag.export_items([("drop", ExportKind::Func, drop_func)]);
            out.section(&bag);
            args.push(("drops".to_string(), ModuleArg::Instance(next_core_instance)));
            next_core_instance += 1;
        }
        out.section(&wasm_encoder::ModuleSection(&module));
        let mut instantiate = InstanceSection::new();
        instantiate.instantiate(c.core_modules, args.iter().map(|(n, a)| (n.as_str(), *a)));
        out.section(&instantiate);
        let accessor_instance = next_core_instance;

        // Its exports, as core items of the component, then lifted.
        let mut aliases = ComponentAliasSection::new();
        let mut core_func = |aliases: &mut ComponentAliasSection, name: &str| {
            aliases.alias(Alias::CoreInstanceExport {
                instance: accessor_instance,
                kind: ExportKind::Func,
                name,
            });
            next_core_func += 1;
            next_core_func - 1
        };
        let get_all = core_func(&mut aliases, "get-all");
        let set_all = core_func(&mut aliases, "set-all");
        let realloc = core_func(&mut aliases, "realloc");
        let grows: Vec<u32> = memories
            .iter()
            .map(|m| core_func(&mut aliases, &m.grow_export))
            .collect();
        let adopt = core_func(&mut aliases, "adopt");
        let drop = filler.map(|_| core_func(&mut aliases, "drop"));
        aliases.alias(Alias::CoreInstanceExport {
            instance: accessor_instance,
            kind: ExportKind::Memory,
            name: "memory",
        });
        let scratch_memory = c.core_memories;
        out.section(&aliases);

        let mut lifts = CanonicalFunctionSection::new();
        let mut items: Vec<(String, u32)> = Vec::new();
        let mut next_func = c.funcs;
        let mut lift = |lifts: &mut CanonicalFunctionSection,
                        name: String,
                        core: u32,
                        ty: u32,
                        options: Vec<CanonicalOption>| {
            lifts.lift(core, ty, options);
            items.push((name, next_func));
            next_func += 1;
        };
        lift(
            &mut lifts,
            "get-all".into(),
            get_all,
            get_all_type,
            vec![CanonicalOption::Memory(scratch_memory)],
        );
        lift(
            &mut lifts,
            "set-all".into(),
            set_all,
            set_all_type,
            vec![
                CanonicalOption::Memory(scratch_memory),
                CanonicalOption::Realloc(realloc),
            ],
        );
        for (memory, core) in memories.iter().zip(&grows) {
            lift(
                &mut lifts,
                memory.grow_export.clone(),
                *core,
                grow_type,
                vec![],
            );
        }
        let mut adopters = Vec::new();
        for (n, (kind, ty)) in adopt_types.iter().enumerate() {
            let name = format!("adopt{n}");
            lift(&mut lifts, name.clone(), adopt, *ty, vec![]);
            adopters.push((*kind, name));
        }
        if let Some(drop) = drop {
            lift(&mut lifts, "drop-filler".into(), drop, drop_type, vec![]);
        }
        out.section(&lifts);

        let mut instance = ComponentInstanceSection::new();
        instance.export_items(
            items
                .iter()
                .map(|(name, index)| (name.as_str(), ComponentExportKind::Func, *index)),
        );
        out.section(&instance);
        let mut export = ComponentExportSection::new();
        export.export(
            ACCESS_EXPORT,
            ComponentExportKind::Instance,
            c.instances,
            None,
        );
        out.section(&export);

        let wasm = out.finish();
        let mut features = wasmparser::WasmFeatures::default();
        features.insert(wasmparser::WasmFeatures::COMPONENT_MODEL);
        wasmparser::Validator::new_with_features(features)
            .validate_all(&wasm)
            .context(
                "wasnap's instrumentation of the component does not validate (a wasnap bug)",
            )?;
        Ok(InstrumentedComponent {
            wasm,
            original_sha256,
            memories,
            globals,
            adopters,
            filler,
        })
    }
}
