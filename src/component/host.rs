//! What a component's imports reach: `functionstream:core/collector` (output),
//! `functionstream:core/kv` (wasnap's own keyed state, inside the checkpoint), and WASI
//! 0.2 from `wasmtime-wasi`, with every WASI function that hands the guest a handle (or
//! takes one back) wrapped so the handle mirror (`handles.rs`) sees it.

use std::collections::{BTreeMap, VecDeque};

use anyhow::Result;
use wasmtime::component::{Linker, Resource, ResourceTable, ResourceType};
use wasmtime::{ResourceLimiter, StoreContextMut, StoreLimits};
use wasmtime_wasi::cli::WasiCliView;
use wasmtime_wasi::p2::bindings::cli::{stderr, stdin, stdout};
use wasmtime_wasi::p2::bindings::sync::io::streams::HostInputStream;
use wasmtime_wasi::p2::bindings::sync::io::streams::HostOutputStream;
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::handles::{HandleTable, HostKey, Recipe};
use super::kv::{Kv, Scope};
use crate::guest::host::MAX_OUTPUT_PER_CALL;

wasmtime::component::bindgen!({
    world: "processor",
    path: "wit/processor.wit",
    imports: { default: trappable },
    with: {
        "functionstream:core/kv.store": KvStoreHandle,
        "functionstream:core/kv.iterator": KvIteratorHandle,
    },
});

use functionstream::core::kv;

/// The host object behind a guest's `kv.store` handle.
pub struct KvStoreHandle {
    name: String,
}

impl KvStoreHandle {
    /// A placeholder a restore puts in a slot that must end up free.
    pub fn filler() -> Self {
        Self {
            name: String::new(),
        }
    }
}

/// The host object behind a `kv.iterator`: what it has yet to yield.
pub struct KvIteratorHandle {
    remaining: VecDeque<(Vec<u8>, Vec<u8>)>,
}

impl KvIteratorHandle {
    pub fn empty() -> Self {
        Self {
            remaining: VecDeque::new(),
        }
    }

    fn bytes(&self) -> usize {
        self.remaining.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// Resource types, as the mirror keys them.
pub mod type_id {
    pub const KV_STORE: u8 = 0;
    pub const KV_ITERATOR: u8 = 1;
    pub const INPUT_STREAM: u8 = 2;
    pub const OUTPUT_STREAM: u8 = 3;
    pub const POLLABLE: u8 = 4;
}

/// The WASI version wasmtime-wasi 48 defines; guests importing any 0.2.x match it.
const WASI: &str = "0.2.12";

/// What the host functions of one component store reach.
pub struct ComponentHost {
    wasi: WasiCtx,
    table: ResourceTable,
    pub kv: Kv,
    pub handles: HandleTable,
    /// The newest watermark emitted per target.
    pub watermarks: BTreeMap<u32, u64>,
    /// Output records since the run loop last drained them, each followed by `\n`, per
    /// target: one per output the run has (`--output` repeated), target 0 first.
    pub emitted: Vec<Vec<u8>>,
    /// While a restore rebuilds the handle table: handles come and go without being
    /// mirrored (the restore builds the mirror itself).
    pub replaying: bool,
    /// Bytes the live kv iterators still hold (each is a copy of its scope): they count
    /// against the kv budget, since every checkpoint writes them too.
    iterator_bytes: usize,
    limits: StoreLimits,
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn trap(message: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::msg(message.into())
}

impl ComponentHost {
    /// A host for a run with `outputs` outputs (at least one).
    pub fn new(wasi: WasiCtx, limits: StoreLimits, outputs: usize) -> Self {
        Self {
            wasi,
            table: ResourceTable::new(),
            kv: Kv::default(),
            handles: HandleTable::default(),
            watermarks: BTreeMap::new(),
            emitted: vec![Vec::new(); outputs.max(1)],
            replaying: false,
            iterator_bytes: 0,
            limits,
        }
    }

    pub fn limits(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }

    pub fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// A handle the guest is about to receive.
    fn mirror_insert(&mut self, type_id: u8, rep: u32, recipe: Recipe) -> wasmtime::Result<()> {
        if self.replaying {
            return Ok(());
        }
        self.handles
            .insert(HostKey { type_id, rep }, recipe)
            .map(drop)
            .map_err(|e| trap(format!("{e:#}")))
    }

    /// A handle the guest dropped.
    fn mirror_remove(&mut self, type_id: u8, rep: u32) -> wasmtime::Result<()> {
        if self.replaying {
            return Ok(());
        }
        self.handles
            .remove(HostKey { type_id, rep })
            .map(drop)
            .map_err(|e| trap(format!("{e:#}")))
    }

    /// Bring every live iterator's recipe up to date (they move without the mirror
    /// seeing it).
    pub fn refresh_iterators(&mut self) {
        let live: Vec<HostKey> = self
            .handles
            .live()
            .filter(|(_, key, _)| key.type_id == type_id::KV_ITERATOR)
            .map(|(_, key, _)| key)
            .collect();
        for key in live {
            let handle = Resource::<KvIteratorHandle>::new_own(key.rep);
            if let Ok(iterator) = self.table.get(&handle) {
                let remaining = iterator.remaining.iter().cloned().collect();
                self.handles.update(key, Recipe::KvIterator { remaining });
            }
        }
    }

    /// Make a recipe's host object again (a restore): its rep in the resource table.
    pub fn make(&mut self, recipe: &Recipe) -> Result<(u8, u32)> {
        Ok(match recipe {
            Recipe::KvStore { name } => {
                self.kv.open(name)?;
                let r = self.table.push(KvStoreHandle { name: name.clone() })?;
                (type_id::KV_STORE, r.rep())
            }
            Recipe::KvIterator { remaining } => {
                let iterator = KvIteratorHandle {
                    remaining: remaining.iter().cloned().collect(),
                };
                self.iterator_bytes += iterator.bytes();
                let r = self.table.push(iterator)?;
                (type_id::KV_ITERATOR, r.rep())
            }
            Recipe::Stdin => (
                type_id::INPUT_STREAM,
                stdin::Host::get_stdin(&mut self.cli())?.rep(),
            ),
            Recipe::Stdout => (
                type_id::OUTPUT_STREAM,
                stdout::Host::get_stdout(&mut self.cli())?.rep(),
            ),
            Recipe::Stderr => (
                type_id::OUTPUT_STREAM,
                stderr::Host::get_stderr(&mut self.cli())?.rep(),
            ),
            Recipe::StreamPollable { .. } | Recipe::Unrestorable(_) => {
                anyhow::bail!("a {} is made from its stream, not alone", recipe.describe())
            }
        })
    }

    /// Subscribe to the stream `stream_rep` again (a restore): the pollable's rep.
    pub fn subscribe(&mut self, stream_type: u8, stream_rep: u32) -> Result<u32> {
        let pollable = if stream_type == type_id::INPUT_STREAM {
            HostInputStream::subscribe(&mut self.table, Resource::new_borrow(stream_rep))?
        } else {
            HostOutputStream::subscribe(&mut self.table, Resource::new_borrow(stream_rep))?
        };
        Ok(pollable.rep())
    }

    /// The recipe of a pollable on the stream `stream_rep` the guest holds.
    fn pollable_recipe(&self, stream_type: u8, stream_rep: u32) -> Recipe {
        match self.handles.index_of(HostKey {
            type_id: stream_type,
            rep: stream_rep,
        }) {
            Some(stream) => Recipe::StreamPollable { stream },
            None => Recipe::Unrestorable("pollable of a stream wasnap did not see"),
        }
    }

    fn store_name(&self, store: &Resource<KvStoreHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(store)?.name.clone())
    }

    /// Output records emitted and not yet drained, all targets.
    pub fn emitted_len(&self) -> usize {
        self.emitted.iter().map(Vec::len).sum()
    }

    /// Target `target_id`'s output, or a trap naming it if the run has no such output.
    fn target(&mut self, target_id: u32, what: &str) -> wasmtime::Result<&mut Vec<u8>> {
        let outputs = self.emitted.len();
        self.emitted.get_mut(target_id as usize).ok_or_else(|| {
            trap(format!(
                "the processor emitted {what} to target {target_id}; this run gives it {outputs} output(s), targets 0..={} (each further --output adds one)",
                outputs - 1
            ))
        })
    }

    fn push_output(&mut self, target_id: u32, data: &[u8]) -> wasmtime::Result<()> {
        if self.emitted_len().saturating_add(data.len() + 1) > MAX_OUTPUT_PER_CALL {
            return Err(trap(format!(
                "the processor's output passed {} MiB within one call (the most wasnap holds before the call returns)",
                MAX_OUTPUT_PER_CALL >> 20
            )));
        }
        let output = self.target(target_id, "a record")?;
        output.extend_from_slice(data);
        output.push(b'\n');
        Ok(())
    }
}

fn scope(key: &kv::ComplexKey) -> Scope {
    (
        key.key_group.clone(),
        key.key.clone(),
        key.namespace.clone(),
    )
}

fn over_budget(err: super::kv::OverBudget) -> wasmtime::Error {
    trap(err.to_string())
}

impl functionstream::core::collector::Host for ComponentHost {
    fn emit(&mut self, target_id: u32, data: Vec<u8>) -> wasmtime::Result<()> {
        self.push_output(target_id, &data)
    }

    fn emit_watermark(&mut self, target_id: u32, watermark: u64) -> wasmtime::Result<()> {
        self.target(target_id, "a watermark")?;
        self.watermarks.insert(target_id, watermark);
        Ok(())
    }
}

impl kv::Host for ComponentHost {}

impl kv::HostStore for ComponentHost {
    fn new(&mut self, name: String) -> wasmtime::Result<Resource<KvStoreHandle>> {
        self.kv.open(&name).map_err(over_budget)?;
        let handle = self.table.push(KvStoreHandle { name: name.clone() })?;
        self.mirror_insert(type_id::KV_STORE, handle.rep(), Recipe::KvStore { name })?;
        Ok(handle)
    }

    fn put_state(
        &mut self,
        store: Resource<KvStoreHandle>,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        let name = self.store_name(&store)?;
        self.kv
            .put_state(&name, &key, &value)
            .map_err(over_budget)?;
        Ok(Ok(()))
    }

    fn get_state(
        &mut self,
        store: Resource<KvStoreHandle>,
        key: Vec<u8>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::Error>> {
        let name = self.store_name(&store)?;
        Ok(Ok(self.kv.get_state(&name, &key).map(<[u8]>::to_vec)))
    }

    fn delete_state(
        &mut self,
        store: Resource<KvStoreHandle>,
        key: Vec<u8>,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        let name = self.store_name(&store)?;
        self.kv.delete_state(&name, &key);
        Ok(Ok(()))
    }

    fn list_states(
        &mut self,
        store: Resource<KvStoreHandle>,
        start_inclusive: Vec<u8>,
        end_exclusive: Vec<u8>,
    ) -> wasmtime::Result<Result<Vec<Vec<u8>>, kv::Error>> {
        let name = self.store_name(&store)?;
        Ok(Ok(self.kv.list_states(
            &name,
            &start_inclusive,
            &end_exclusive,
        )))
    }

    fn put(
        &mut self,
        store: Resource<KvStoreHandle>,
        key: kv::ComplexKey,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        let name = self.store_name(&store)?;
        self.kv
            .put(&name, scope(&key), &key.user_key, value)
            .map_err(over_budget)?;
        Ok(Ok(()))
    }

    fn get(
        &mut self,
        store: Resource<KvStoreHandle>,
        key: kv::ComplexKey,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::Error>> {
        let name = self.store_name(&store)?;
        Ok(Ok(self
            .kv
            .get(&name, &scope(&key), &key.user_key)
            .map(<[u8]>::to_vec)))
    }

    fn delete(
        &mut self,
        store: Resource<KvStoreHandle>,
        key: kv::ComplexKey,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        let name = self.store_name(&store)?;
        self.kv.delete(&name, &scope(&key), &key.user_key);
        Ok(Ok(()))
    }

    fn merge(
        &mut self,
        store: Resource<KvStoreHandle>,
        key: kv::ComplexKey,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        let name = self.store_name(&store)?;
        self.kv
            .merge(&name, scope(&key), &key.user_key, &value)
            .map_err(over_budget)?;
        Ok(Ok(()))
    }

    fn delete_prefix(
        &mut self,
        store: Resource<KvStoreHandle>,
        key: kv::ComplexKey,
    ) -> wasmtime::Result<Result<(), kv::Error>> {
        let name = self.store_name(&store)?;
        self.kv.delete_prefix(&name, &scope(&key), &key.user_key);
        Ok(Ok(()))
    }

    fn list_complex(
        &mut self,
        store: Resource<KvStoreHandle>,
        key_group: Vec<u8>,
        key: Vec<u8>,
        namespace: Vec<u8>,
        start_inclusive: Vec<u8>,
        end_exclusive: Vec<u8>,
    ) -> wasmtime::Result<Result<Vec<Vec<u8>>, kv::Error>> {
        let name = self.store_name(&store)?;
        Ok(Ok(self.kv.list_complex(
            &name,
            &(key_group, key, namespace),
            &start_inclusive,
            &end_exclusive,
        )))
    }

    fn scan_complex(
        &mut self,
        store: Resource<KvStoreHandle>,
        key_group: Vec<u8>,
        key: Vec<u8>,
        namespace: Vec<u8>,
    ) -> wasmtime::Result<Result<Resource<KvIteratorHandle>, kv::Error>> {
        let name = self.store_name(&store)?;
        let iterator = KvIteratorHandle {
            remaining: self.kv.scan(&name, &(key_group, key, namespace)).into(),
        };
        let would_hold = self.kv.bytes() + self.iterator_bytes + iterator.bytes();
        if would_hold > super::kv::MAX_KV_BYTES {
            return Err(trap(format!(
                "the processor's kv state and open iterators would hold {would_hold} bytes, more than wasnap's limit of {} MiB",
                super::kv::MAX_KV_BYTES >> 20
            )));
        }
        self.iterator_bytes += iterator.bytes();
        let handle = self.table.push(iterator)?;
        self.mirror_insert(
            type_id::KV_ITERATOR,
            handle.rep(),
            Recipe::KvIterator {
                remaining: Vec::new(),
            },
        )?;
        Ok(Ok(handle))
    }

    fn drop(&mut self, store: Resource<KvStoreHandle>) -> wasmtime::Result<()> {
        self.mirror_remove(type_id::KV_STORE, store.rep())?;
        self.table.delete(store)?;
        Ok(())
    }
}

impl kv::HostIterator for ComponentHost {
    fn has_next(
        &mut self,
        iterator: Resource<KvIteratorHandle>,
    ) -> wasmtime::Result<Result<bool, kv::Error>> {
        Ok(Ok(!self.table.get(&iterator)?.remaining.is_empty()))
    }

    fn next(
        &mut self,
        iterator: Resource<KvIteratorHandle>,
    ) -> wasmtime::Result<Result<Option<(Vec<u8>, Vec<u8>)>, kv::Error>> {
        let next = self.table.get_mut(&iterator)?.remaining.pop_front();
        if let Some((k, v)) = &next {
            self.iterator_bytes -= k.len() + v.len();
        }
        Ok(Ok(next))
    }

    fn drop(&mut self, iterator: Resource<KvIteratorHandle>) -> wasmtime::Result<()> {
        self.mirror_remove(type_id::KV_ITERATOR, iterator.rep())?;
        let iterator = self.table.delete(iterator)?;
        self.iterator_bytes -= iterator.bytes();
        Ok(())
    }
}

/// Everything a component may import: WASI 0.2, the collector and kv, with the WASI
/// functions that move handles redefined to keep the mirror.
pub fn linker(engine: &wasmtime::Engine) -> Result<Linker<ComponentHost>> {
    let mut linker = Linker::<ComponentHost>::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    Processor::add_to_linker::<ComponentHost, wasmtime::component::HasSelf<ComponentHost>>(
        &mut linker,
        |s| s,
    )?;
    linker.allow_shadowing(true);
    mirror_wasi(&mut linker)?;
    Ok(linker)
}

fn mirror_wasi(linker: &mut Linker<ComponentHost>) -> Result<()> {
    type Cx<'a> = StoreContextMut<'a, ComponentHost>;

    let mut stdin = linker.instance(&format!("wasi:cli/stdin@{WASI}"))?;
    stdin.func_wrap("get-stdin", |mut cx: Cx<'_>, (): ()| {
        let host = cx.data_mut();
        let r = stdin::Host::get_stdin(&mut host.cli())?;
        host.mirror_insert(type_id::INPUT_STREAM, r.rep(), Recipe::Stdin)?;
        Ok((r,))
    })?;
    let mut stdout = linker.instance(&format!("wasi:cli/stdout@{WASI}"))?;
    stdout.func_wrap("get-stdout", |mut cx: Cx<'_>, (): ()| {
        let host = cx.data_mut();
        let r = stdout::Host::get_stdout(&mut host.cli())?;
        host.mirror_insert(type_id::OUTPUT_STREAM, r.rep(), Recipe::Stdout)?;
        Ok((r,))
    })?;
    let mut stderr = linker.instance(&format!("wasi:cli/stderr@{WASI}"))?;
    stderr.func_wrap("get-stderr", |mut cx: Cx<'_>, (): ()| {
        let host = cx.data_mut();
        let r = stderr::Host::get_stderr(&mut host.cli())?;
        host.mirror_insert(type_id::OUTPUT_STREAM, r.rep(), Recipe::Stderr)?;
        Ok((r,))
    })?;

    let mut streams = linker.instance(&format!("wasi:io/streams@{WASI}"))?;
    streams.resource(
        "output-stream",
        ResourceType::host::<DynOutputStream>(),
        |mut cx: Cx<'_>, rep| {
            let host = cx.data_mut();
            host.mirror_remove(type_id::OUTPUT_STREAM, rep)?;
            HostOutputStream::drop(&mut host.table, Resource::new_own(rep))
        },
    )?;
    streams.resource(
        "input-stream",
        ResourceType::host::<DynInputStream>(),
        |mut cx: Cx<'_>, rep| {
            let host = cx.data_mut();
            host.mirror_remove(type_id::INPUT_STREAM, rep)?;
            HostInputStream::drop(&mut host.table, Resource::new_own(rep))
        },
    )?;
    streams.func_wrap(
        "[method]output-stream.subscribe",
        |mut cx: Cx<'_>, (stream,): (Resource<DynOutputStream>,)| {
            let host = cx.data_mut();
            let recipe = host.pollable_recipe(type_id::OUTPUT_STREAM, stream.rep());
            let pollable = HostOutputStream::subscribe(&mut host.table, stream)?;
            host.mirror_insert(type_id::POLLABLE, pollable.rep(), recipe)?;
            Ok((pollable,))
        },
    )?;
    streams.func_wrap(
        "[method]input-stream.subscribe",
        |mut cx: Cx<'_>, (stream,): (Resource<DynInputStream>,)| {
            let host = cx.data_mut();
            let recipe = host.pollable_recipe(type_id::INPUT_STREAM, stream.rep());
            let pollable = HostInputStream::subscribe(&mut host.table, stream)?;
            host.mirror_insert(type_id::POLLABLE, pollable.rep(), recipe)?;
            Ok((pollable,))
        },
    )?;

    let mut poll = linker.instance(&format!("wasi:io/poll@{WASI}"))?;
    poll.resource(
        "pollable",
        ResourceType::host::<DynPollable>(),
        |mut cx: Cx<'_>, rep| {
            let host = cx.data_mut();
            host.mirror_remove(type_id::POLLABLE, rep)?;
            host.table.delete(Resource::<DynPollable>::new_own(rep))?;
            Ok(())
        },
    )?;

    let mut clock = linker.instance(&format!("wasi:clocks/monotonic-clock@{WASI}"))?;
    clock.func_wrap("subscribe-instant", |mut cx: Cx<'_>, (when,): (u64,)| {
        use wasmtime_wasi::clocks::WasiClocksView;
        use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host;
        let host = cx.data_mut();
        let pollable = host.clocks().subscribe_instant(when)?;
        host.mirror_insert(
            type_id::POLLABLE,
            pollable.rep(),
            Recipe::Unrestorable("WASI clock pollable"),
        )?;
        Ok((pollable,))
    })?;
    clock.func_wrap(
        "subscribe-duration",
        |mut cx: Cx<'_>, (duration,): (u64,)| {
            use wasmtime_wasi::clocks::WasiClocksView;
            use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host;
            let host = cx.data_mut();
            let pollable = host.clocks().subscribe_duration(duration)?;
            host.mirror_insert(
                type_id::POLLABLE,
                pollable.rep(),
                Recipe::Unrestorable("WASI clock pollable"),
            )?;
            Ok((pollable,))
        },
    )?;

    // No network for processors: a socket handle could never be made again.
    for (interface, function) in [
        ("wasi:sockets/instance-network", "instance-network"),
        ("wasi:sockets/tcp-create-socket", "create-tcp-socket"),
        ("wasi:sockets/udp-create-socket", "create-udp-socket"),
        ("wasi:sockets/ip-name-lookup", "resolve-addresses"),
    ] {
        let mut instance = linker.instance(&format!("{interface}@{WASI}"))?;
        let what = format!("{interface}.{function}");
        instance.func_new(function, move |_, _, _, _| {
            Err(trap(format!(
                "the processor called {what}; wasnap gives components no network"
            )))
        })?;
    }
    Ok(())
}
