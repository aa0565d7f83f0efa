//! One live component: its store, the processor's exports, and typed handles on the
//! accessor (`instrument.rs`) through which its state is read and written.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use wasmtime::component::{Resource, TypedFunc};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};

use super::host::{ComponentHost, KvIteratorHandle, KvStoreHandle, Processor, type_id};
use super::instrument::{ACCESS_EXPORT, ResourceKind};
use super::memories::{self, HostMemory};
use super::{CompiledComponent, handles, kv, kv_runs};
use crate::codec::{Put, Reader};
use crate::error::{ErrorKind, corrupt, error};
use crate::guest::Limits;
use crate::guest::random::DeterministicRandom;
use crate::state::{GlobalKind, GlobalValue};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable};

/// An `adoptK` export, typed by the resource it takes.
enum Adopter {
    KvStore(TypedFunc<(Resource<KvStoreHandle>,), (u32,)>),
    KvIterator(TypedFunc<(Resource<KvIteratorHandle>,), (u32,)>),
    InputStream(TypedFunc<(Resource<DynInputStream>,), (u32,)>),
    OutputStream(TypedFunc<(Resource<DynOutputStream>,), (u32,)>),
    Pollable(TypedFunc<(Resource<DynPollable>,), (u32,)>),
}

pub struct ComponentInstance {
    store: Store<ComponentHost>,
    processor: Processor,
    memories: Vec<Arc<HostMemory>>,
    get_all: TypedFunc<(), (Vec<u64>,)>,
    set_all: TypedFunc<(Vec<u64>,), ()>,
    grows: Vec<TypedFunc<(u64,), (i64,)>>,
    adopters: Vec<(ResourceKind, Adopter)>,
    drop_filler: Option<TypedFunc<(u32,), ()>>,
    filler: Option<ResourceKind>,
    globals: Vec<GlobalKind>,
    random: DeterministicRandom,
    limits: Limits,
    config: Vec<(String, String)>,
    /// The kv chain of the last checkpoint (`kv_runs`).
    kv_log: kv_runs::KvLog,
}

/// A guest error as one line, of kind `Guest`.
fn describe(err: wasmtime::Error, function: &str, limits: &Limits) -> anyhow::Error {
    if let Some(wasmtime::Trap::Interrupt) = err.downcast_ref::<wasmtime::Trap>() {
        let ms = limits.call_timeout.map_or(0, |t| t.as_millis());
        return crate::error::GuestTimedOut(format!(
            "the processor ran past its time limit of {ms} ms in `{function}`"
        ))
        .into();
    }
    if let Some(backtrace) = err.downcast_ref::<wasmtime::WasmBacktrace>() {
        tracing::debug!("the processor failed in `{function}`: {backtrace}");
    }
    let backtrace = err
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|b| b.to_string());
    let err = anyhow::Error::from(err);
    let causes: Vec<String> = err
        .chain()
        .map(|cause| cause.to_string())
        .filter(|cause| Some(cause) != backtrace.as_ref())
        .collect();
    error(
        ErrorKind::Guest,
        format!(
            "the processor failed in `{function}`: {}",
            causes.join(": ")
        ),
    )
}

impl ComponentInstance {
    pub(crate) fn new(
        compiled: &CompiledComponent,
        limits: Limits,
        random_seed: u64,
        random_position: u64,
    ) -> Result<Self> {
        let random = DeterministicRandom::new(random_seed, random_position);
        let clock = crate::guest::wasi::GuestClock::new();
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stdout(super::stdio::Diagnostics)
            .stderr(super::stdio::Diagnostics)
            .monotonic_clock(clock)
            .secure_random(random.clone())
            .insecure_random(random.clone())
            .insecure_random_seed(u128::from(random_seed))
            .build();
        let store_limits = match limits.max_memory_bytes {
            Some(max) => StoreLimitsBuilder::new()
                .memory_size(usize::try_from(max).unwrap_or(usize::MAX))
                .trap_on_grow_failure(true)
                .build(),
            None => StoreLimits::default(),
        };
        let host = ComponentHost::new(wasi, store_limits, compiled.outputs);
        let mut store = Store::new(&compiled.engine, host);
        store.limiter(ComponentHost::limits);
        if let Some(ticks) = limits.deadline_ticks() {
            store.set_epoch_deadline(ticks);
        }
        let (instance, mut allocated) =
            memories::collect_during(|| compiled.pre.instantiate(&mut store));
        let instance = instance
            .map_err(|e| describe(e, "instantiation", &limits))
            .context("cannot instantiate the component")?;
        // The accessor's scratch memory is allocated last; it is not the guest's.
        if allocated.len() != compiled.state.memories.len() + 1 {
            bail!(
                "the component allocated {} memories where wasnap expected {} (a wasnap bug)",
                allocated.len(),
                compiled.state.memories.len() + 1
            );
        }
        allocated.pop();
        for (i, (memory, info)) in allocated.iter().zip(&compiled.state.memories).enumerate() {
            if memory.ty.is_64() != info.is_64 || memory.ty.minimum() != info.minimum {
                bail!(
                    "memory {i} of the component is not the one wasnap expected there (a wasnap bug)"
                );
            }
        }
        if store.data().handles.live().next().is_some() {
            bail!(
                "the component took resource handles while it was instantiated; wasnap cannot restore those"
            );
        }
        let processor = Processor::new(&mut store, &instance)
            .map_err(anyhow::Error::from)
            .context("the component is not a `functionstream:core/processor`")?;

        let access = instance
            .get_export_index(&mut store, None, ACCESS_EXPORT)
            .ok_or_else(|| {
                anyhow!("the instrumented component lacks its accessor (a wasnap bug)")
            })?;
        let func = |store: &mut Store<ComponentHost>, name: &str| {
            instance
                .get_export_index(&mut *store, Some(&access), name)
                .ok_or_else(|| anyhow!("the accessor lacks `{name}` (a wasnap bug)"))
        };
        let f = func(&mut store, "get-all")?;
        let get_all = instance.get_typed_func(&mut store, f)?;
        let f = func(&mut store, "set-all")?;
        let set_all = instance.get_typed_func(&mut store, f)?;
        let mut grows = Vec::new();
        for memory in &compiled.state.memories {
            let f = func(&mut store, &memory.grow_export)?;
            grows.push(instance.get_typed_func(&mut store, f)?);
        }
        let mut adopters = Vec::new();
        for (kind, name) in &compiled.state.adopters {
            let f = func(&mut store, name)?;
            let adopter = match kind {
                ResourceKind::KvStore => Adopter::KvStore(instance.get_typed_func(&mut store, f)?),
                ResourceKind::KvIterator => {
                    Adopter::KvIterator(instance.get_typed_func(&mut store, f)?)
                }
                ResourceKind::InputStream => {
                    Adopter::InputStream(instance.get_typed_func(&mut store, f)?)
                }
                ResourceKind::OutputStream => {
                    Adopter::OutputStream(instance.get_typed_func(&mut store, f)?)
                }
                ResourceKind::Pollable => {
                    Adopter::Pollable(instance.get_typed_func(&mut store, f)?)
                }
            };
            adopters.push((*kind, adopter));
        }
        let drop_filler = match compiled.state.filler {
            Some(_) => {
                let f = func(&mut store, "drop-filler")?;
                Some(instance.get_typed_func(&mut store, f)?)
            }
            None => None,
        };
        Ok(Self {
            store,
            processor,
            memories: allocated,
            get_all,
            set_all,
            grows,
            adopters,
            drop_filler,
            filler: compiled.state.filler,
            globals: compiled.state.globals.clone(),
            random,
            limits,
            config: compiled.config.clone(),
            kv_log: kv_runs::KvLog::default(),
        })
    }

    fn arm_deadline(&mut self) {
        if let Some(ticks) = self.limits.deadline_ticks() {
            self.store.set_epoch_deadline(ticks);
        }
    }

    /// `fs-init` with the configured pairs: only on a fresh start.
    pub fn start_fresh(&mut self) -> Result<()> {
        self.arm_deadline();
        self.processor
            .call_fs_init(&mut self.store, &self.config)
            .map_err(|e| describe(e, "fs-init", &self.limits))
    }

    /// One input record: `fs-process(0, record)`.
    pub fn process(&mut self, record: &[u8]) -> Result<()> {
        self.arm_deadline();
        self.processor
            .call_fs_process(&mut self.store, 0, record)
            .map_err(|e| describe(e, "fs-process", &self.limits))
    }

    /// Hand each target's records to its output of `sink`.
    pub fn take_emitted(&mut self, sink: &mut dyn crate::stream::Sink) -> Result<()> {
        for (target, records) in self.store.data_mut().emitted.iter_mut().enumerate() {
            if records.is_empty() {
                continue;
            }
            let Some(output) = sink.target_buffer(target) else {
                bail!("the processor emitted to target {target}, and the run has no such output");
            };
            output.append(records);
        }
        Ok(())
    }

    pub fn emitted_len(&self) -> usize {
        self.store.data().emitted_len()
    }

    pub fn memory_count(&self) -> usize {
        self.memories.len()
    }

    pub fn memory(&self, index: usize) -> &[u8] {
        // SAFETY: no guest call is running (`&self` excludes one) and the store, which
        // owns the mapping, lives as long as `self`.
        unsafe { self.memories[index].bytes() }
    }

    pub fn memory_mut(&mut self, index: usize) -> &mut [u8] {
        // SAFETY: as for `memory`, and `&mut self` makes this the only view.
        unsafe { self.memories[index].bytes_mut() }
    }

    /// The most bytes memory `index` may ever hold ([`Limits::memory_limit`]; no more
    /// than wasnap reserved for it).
    pub fn memory_limit(&self, index: usize) -> (u64, Option<u64>) {
        let memory = &self.memories[index];
        self.limits
            .memory_limit(&memory.ty, memory.capacity() as u64)
    }

    /// Grow memory `index` to exactly `bytes`, through the guest's own `memory.grow`.
    pub fn grow_memory_to(&mut self, index: usize, bytes: u64) -> Result<()> {
        let current = self.memories[index].byte_len() as u64;
        let page = self.memories[index].ty.page_size();
        if bytes < current {
            bail!(
                "memory {index} is {current} bytes in a fresh instance but {bytes} in the checkpoint"
            );
        }
        if !(bytes - current).is_multiple_of(page) {
            bail!(
                "memory {index}: checkpoint size {bytes} is not a whole number of {page}-byte pages"
            );
        }
        if bytes > current {
            let grow = self.grows[index];
            let (old,) = grow
                .call(&mut self.store, ((bytes - current) / page,))
                .map_err(|e| describe(e, "wasnap's memory.grow", &self.limits))?;
            if old < 0 || self.memories[index].byte_len() as u64 != bytes {
                bail!("cannot grow memory {index} to {bytes} bytes");
            }
        }
        Ok(())
    }

    pub fn globals(&mut self) -> Result<Vec<GlobalValue>> {
        let (values,) = self
            .get_all
            .call(&mut self.store, ())
            .map_err(|e| describe(e, "wasnap's global reader", &self.limits))?;
        if values.len() != self.globals.len() {
            bail!(
                "the accessor returned {} globals, not {} (a wasnap bug)",
                values.len(),
                self.globals.len()
            );
        }
        Ok(values
            .into_iter()
            .zip(&self.globals)
            .map(|(v, kind)| match kind {
                GlobalKind::I32 => GlobalValue::I32(v as u32 as i32),
                GlobalKind::I64 => GlobalValue::I64(v as i64),
                GlobalKind::F32 => GlobalValue::F32(v as u32),
                GlobalKind::F64 => GlobalValue::F64(v),
                GlobalKind::V128 => unreachable!("refused by the instrumentation"),
            })
            .collect())
    }

    pub fn set_globals(&mut self, values: &[GlobalValue]) -> Result<()> {
        if values.len() != self.globals.len() {
            bail!(
                "the checkpoint holds {} globals but the component has {}",
                values.len(),
                self.globals.len()
            );
        }
        let mut raw = Vec::with_capacity(values.len());
        for (i, (value, kind)) in values.iter().zip(&self.globals).enumerate() {
            if value.kind() != *kind {
                bail!(
                    "global {i} is {kind:?} in the component but {:?} in the checkpoint",
                    value.kind()
                );
            }
            raw.push(match *value {
                GlobalValue::I32(v) => v as u32 as u64,
                GlobalValue::I64(v) => v as u64,
                GlobalValue::F32(v) => u64::from(v),
                GlobalValue::F64(v) => v,
                GlobalValue::V128(_) => unreachable!("refused by the instrumentation"),
            });
        }
        self.set_all
            .call(&mut self.store, (raw,))
            .map_err(|e| describe(e, "wasnap's global writer", &self.limits))
    }

    pub fn random_position(&self) -> u64 {
        self.random.position()
    }

    pub fn rewind_host_state(&mut self, random_position: u64) {
        self.random.set_position(random_position);
        self.store
            .data_mut()
            .emitted
            .iter_mut()
            .for_each(Vec::clear);
    }

    /// What the host holds for the guest, for a checkpoint: a summary of the kv state,
    /// the handle table and the watermarks (docs/FORMAT.md, "Component host state"),
    /// and the kv runs to write (`None`: the kv state did not change).
    pub fn host_state(&mut self) -> Result<(Vec<u8>, Option<kv_runs::KvUpdate>)> {
        self.check_mirror()?;
        // Every live handle must be one a restore can hand back: of a type the accessor
        // adopts (a component that imports one interface twice, at two versions, may hold
        // handles of a type it was not instrumented for).
        for (index, _, recipe) in self.store.data().handles.live() {
            if let Some(kind) = kind_of(recipe)
                && !self.adopters.iter().any(|(k, _)| *k == kind)
            {
                bail!(error(
                    ErrorKind::Guest,
                    format!(
                        "the guest holds a {} handle (index {index}) of a type wasnap cannot give back after a restore",
                        recipe.describe()
                    )
                ));
            }
        }
        let host = self.store.data_mut();
        host.refresh_iterators();
        let mut out = Vec::with_capacity(256);
        out.push(HOST_STATE_VERSION);
        KvSummary::of(&host.kv).encode(&mut out);
        host.handles.encode(&mut out)?;
        out.put_varint(host.watermarks.len() as u64);
        for (target, watermark) in &host.watermarks {
            out.put_varint(u64::from(*target));
            out.put_varint(*watermark);
        }
        let update = self.kv_log.capture(&mut host.kv);
        Ok((out, update))
    }

    /// Check the handle mirror against wasmtime's table where it can be asked: hand the
    /// guest a throw-away handle and take it back at once (which leaves the table as it
    /// was: the slot goes back to the head of the free chain), and compare the index it
    /// got with the one the mirror predicts. A mirror that missed a handle coming or going
    /// refuses the checkpoint instead of writing a table a restore would get wrong.
    fn check_mirror(&mut self) -> Result<()> {
        let Some(kind) = self.filler else {
            return Ok(());
        };
        let predicted = self.store.data().handles.next_index();
        self.store.data_mut().replaying = true;
        let probed = self.probe_next_index(kind);
        self.store.data_mut().replaying = false;
        let actual = probed?;
        if actual != predicted {
            bail!(error(
                ErrorKind::Guest,
                format!(
                    "wasnap lost track of the guest's resource handles (the next one would be {actual}, wasnap expected {predicted}); the checkpoint is refused"
                )
            ));
        }
        Ok(())
    }

    fn probe_next_index(&mut self, kind: ResourceKind) -> Result<u32> {
        let (_, rep) = self.make_filler(kind)?;
        let index = self.adopt(kind, rep)?;
        if let Some(drop_filler) = self.drop_filler {
            drop_filler
                .call(&mut self.store, (index,))
                .map_err(|e| describe(e, "wasnap's handle check", &self.limits))?;
        }
        Ok(index)
    }

    /// Put a checkpoint's host state back: the kv state from the chain of `kv_runs`
    /// (checked against the summary), the watermarks, and the guest's handle table,
    /// rebuilt slot by slot with every index checked.
    pub fn restore_host_state(&mut self, bytes: &[u8], kv_runs: &[Vec<u8>]) -> Result<()> {
        let saved = SavedHostState::decode(bytes)?;
        let (kv, kv_log) = kv_runs::KvLog::restore(kv_runs.iter().map(Vec::as_slice))?;
        let rebuilt = KvSummary::of(&kv);
        if rebuilt != saved.kv {
            return Err(corrupt!(
                "the checkpoint's kv runs rebuild {} bytes with digest {:016x}, not the {} bytes with digest {:016x} it recorded",
                rebuilt.bytes,
                rebuilt.digest,
                saved.kv.bytes,
                saved.kv.digest
            ));
        }
        self.kv_log = kv_log;
        {
            let host = self.store.data_mut();
            host.kv = kv;
            host.watermarks = saved.watermarks;
            host.replaying = true;
        }
        let rebuilt = self.replay_handles(&saved.handles);
        self.store.data_mut().replaying = false;
        let keys = rebuilt?;
        self.store.data_mut().handles = handles::HandleTable::rebuilt(&saved.handles, &keys);
        Ok(())
    }

    fn replay_handles(
        &mut self,
        decoded: &handles::DecodedTable,
    ) -> Result<Vec<Option<handles::HostKey>>> {
        use handles::Recipe;
        // Make every host object first (streams before the pollables subscribed to
        // them), then hand them to the guest in index order.
        let mut made: Vec<Option<(ResourceKind, u8, u32)>> = vec![None; decoded.recipes.len()];
        for (slot, recipe) in decoded.recipes.iter().enumerate() {
            let kind = match recipe {
                None | Some(Recipe::StreamPollable { .. }) => continue,
                Some(recipe) => match kind_of(recipe) {
                    Some(kind) => kind,
                    None => bail!("a checkpoint cannot hold a {}", recipe.describe()),
                },
            };
            let (type_id, rep) = self
                .store
                .data_mut()
                .make(recipe.as_ref().expect("matched"))?;
            made[slot] = Some((kind, type_id, rep));
        }
        for (slot, recipe) in decoded.recipes.iter().enumerate() {
            if let Some(Recipe::StreamPollable { stream }) = recipe {
                let (_, stream_type, stream_rep) = made[*stream as usize - 1].ok_or_else(|| {
                    corrupt!(
                        "a checkpoint's pollable refers to handle {stream}, which is not a stream"
                    )
                })?;
                let rep = self.store.data_mut().subscribe(stream_type, stream_rep)?;
                made[slot] = Some((ResourceKind::Pollable, type_id::POLLABLE, rep));
            }
        }
        let mut keys = Vec::with_capacity(decoded.recipes.len());
        for (slot, made) in made.into_iter().enumerate() {
            let expected = slot as u32 + 1;
            let (kind, type_id, rep) = match made {
                Some(made) => made,
                None => {
                    let kind = self.filler.ok_or_else(|| {
                        corrupt!("the checkpoint's handle table has free slots but the component takes no handles")
                    })?;
                    let (type_id, rep) = self.make_filler(kind)?;
                    (kind, type_id, rep)
                }
            };
            let index = self.adopt(kind, rep)?;
            if index != expected {
                bail!(
                    "restoring the guest's handle table: wasmtime gave index {index} where the checkpoint had {expected}"
                );
            }
            let live = decoded.recipes[slot].is_some();
            keys.push(live.then_some(handles::HostKey { type_id, rep }));
        }
        if let Some(drop_filler) = self.drop_filler {
            for index in decoded.chain.iter().rev() {
                drop_filler
                    .call(&mut self.store, (*index,))
                    .map_err(|e| describe(e, "wasnap's handle replay", &self.limits))?;
            }
        }
        Ok(keys)
    }

    fn make_filler(&mut self, kind: ResourceKind) -> Result<(u8, u32)> {
        let table = self.store.data_mut().table();
        Ok(match kind {
            ResourceKind::KvStore => (
                type_id::KV_STORE,
                table.push(KvStoreHandle::filler())?.rep(),
            ),
            ResourceKind::KvIterator => (
                type_id::KV_ITERATOR,
                table.push(KvIteratorHandle::empty())?.rep(),
            ),
            ResourceKind::InputStream => {
                let stream: DynInputStream = Box::new(wasmtime_wasi::p2::pipe::ClosedInputStream);
                (type_id::INPUT_STREAM, table.push(stream)?.rep())
            }
            ResourceKind::OutputStream => {
                let stream: DynOutputStream = Box::new(wasmtime_wasi::p2::pipe::SinkOutputStream);
                (type_id::OUTPUT_STREAM, table.push(stream)?.rep())
            }
            ResourceKind::Pollable => {
                bail!("a component that imports no stream cannot hold free pollable slots")
            }
        })
    }

    fn adopt(&mut self, kind: ResourceKind, rep: u32) -> Result<u32> {
        let (_, adopter) = self
            .adopters
            .iter()
            .find(|(k, _)| *k == kind)
            .ok_or_else(|| {
                corrupt!(
                    "the checkpoint holds a handle of type {kind:?} but the component imports no such type"
                )
            })?;
        let result = match adopter {
            Adopter::KvStore(f) => f.call(&mut self.store, (Resource::new_own(rep),)),
            Adopter::KvIterator(f) => f.call(&mut self.store, (Resource::new_own(rep),)),
            Adopter::InputStream(f) => f.call(&mut self.store, (Resource::new_own(rep),)),
            Adopter::OutputStream(f) => f.call(&mut self.store, (Resource::new_own(rep),)),
            Adopter::Pollable(f) => f.call(&mut self.store, (Resource::new_own(rep),)),
        };
        let (index,) = result.map_err(|e| describe(e, "wasnap's handle replay", &self.limits))?;
        Ok(index)
    }

    /// The newest watermark per target.
    pub fn watermarks(&self) -> Vec<(u32, u64)> {
        self.store
            .data()
            .watermarks
            .iter()
            .map(|(t, w)| (*t, *w))
            .collect()
    }
}

/// The resource type of a restorable handle.
fn kind_of(recipe: &handles::Recipe) -> Option<ResourceKind> {
    use handles::Recipe;
    Some(match recipe {
        Recipe::KvStore { .. } => ResourceKind::KvStore,
        Recipe::KvIterator { .. } => ResourceKind::KvIterator,
        Recipe::Stdin => ResourceKind::InputStream,
        Recipe::Stdout | Recipe::Stderr => ResourceKind::OutputStream,
        Recipe::StreamPollable { .. } => ResourceKind::Pollable,
        Recipe::Unrestorable(_) => return None,
    })
}

/// The first byte of a component's host state.
const HOST_STATE_VERSION: u8 = 2;

/// What a checkpoint records of the kv state beside its runs: enough to check a restore
/// and to describe it.
#[derive(Debug, PartialEq, Eq)]
struct KvSummary {
    bytes: u64,
    digest: u64,
    stores: Vec<String>,
}

impl KvSummary {
    fn of(kv: &kv::Kv) -> Self {
        KvSummary {
            bytes: kv.bytes() as u64,
            digest: kv.digest(),
            stores: kv.store_names().map(str::to_string).collect(),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.put_varint(self.bytes);
        out.put_u64(self.digest);
        out.put_varint(self.stores.len() as u64);
        for name in &self.stores {
            kv::put_bytes(out, name.as_bytes());
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let bytes = r.varint()?;
        let digest = r.u64()?;
        let stores = (0..r.varint_count(1)?)
            .map(|_| {
                String::from_utf8(kv::read_bytes(r)?.to_vec())
                    .map_err(|_| corrupt!("a kv store name is not UTF-8"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvSummary {
            bytes,
            digest,
            stores,
        })
    }
}

/// A checkpoint's host state, read back (checked, see docs/FORMAT.md).
struct SavedHostState {
    kv: KvSummary,
    handles: handles::DecodedTable,
    watermarks: std::collections::BTreeMap<u32, u64>,
}

impl SavedHostState {
    fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "the checkpoint's component state");
        if bytes.is_empty() || r.u8()? != HOST_STATE_VERSION {
            return Err(corrupt!(
                "the checkpoint's component state has an unknown version"
            ));
        }
        let kv = KvSummary::decode(&mut r)?;
        let handles = handles::HandleTable::decode(&mut r)?;
        let mut watermarks = std::collections::BTreeMap::new();
        for _ in 0..r.varint_count(2)? {
            watermarks.insert(r.varint_u32()?, r.varint()?);
        }
        r.finish()?;
        Ok(Self {
            kv,
            handles,
            watermarks,
        })
    }
}

/// Read a checkpoint's host state for `inspect`: kv bytes and stores, live handles,
/// watermarks.
pub fn describe_host_state(bytes: &[u8]) -> Result<String> {
    let SavedHostState {
        kv,
        handles: decoded,
        watermarks,
    } = SavedHostState::decode(bytes)?;
    let watermarks: Vec<String> = watermarks.iter().map(|(t, w)| format!("{t}={w}")).collect();
    let live: Vec<String> = decoded
        .recipes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| format!("{}:{}", i + 1, r.describe())))
        .collect();
    Ok(format!(
        "kv {} bytes in store(s) [{}]; handles [{}] of {} slots; watermarks [{}]",
        kv.bytes,
        kv.stores.join(", "),
        live.join(", "),
        decoded.recipes.len(),
        watermarks.join(", ")
    ))
}
