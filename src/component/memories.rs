//! The linear memories inside a component, allocated by wasnap so it knows where they
//! are.
//!
//! wasmtime's component API gives the host no handle on the memories of the core
//! instances inside a component. It does call the engine's `MemoryCreator` for every
//! memory it allocates (with the on-demand allocator), so wasnap allocates them itself:
//! an anonymous mapping reserved at its largest size, of which the first `byte_size`
//! bytes are readable and writable. The snapshot stage reads them as plain byte slices,
//! and kernel dirty tracking works on them as on any other memory.
//!
//! The creator is told nothing about which instance a memory belongs to. An instantiation
//! allocates memories in a fixed order (core instances in the order the component
//! instantiates them, each one's memories in index order), so the memories a thread
//! allocates while it instantiates are collected, in order, into that instantiation's
//! list ([`collect_during`]).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// One memory: where it starts, and how many bytes it has now (wasmtime grows it).
#[derive(Debug)]
pub struct HostMemory {
    base: usize,
    size: Arc<AtomicUsize>,
    /// What the memory may ever grow to without moving.
    capacity: usize,
    pub ty: MemoryType,
}

impl HostMemory {
    /// The memory's current bytes.
    ///
    /// # Safety
    /// No guest code may run while the slice lives (the store is not in a call), and the
    /// memory's instance must be alive.
    pub unsafe fn bytes(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.base as *const u8, self.byte_len()) }
    }

    /// [`HostMemory::bytes`], writable (restore only). Same safety rules.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.base as *mut u8, self.byte_len()) }
    }

    /// Bytes the memory has now.
    pub fn byte_len(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

thread_local! {
    static COLLECTING: RefCell<Option<Vec<Arc<HostMemory>>>> = const { RefCell::new(None) };
}

/// Run `instantiate` and return what it returned with the memories it allocated, in
/// allocation order.
pub fn collect_during<T>(instantiate: impl FnOnce() -> T) -> (T, Vec<Arc<HostMemory>>) {
    COLLECTING.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let result = instantiate();
    let memories = COLLECTING
        .with(|c| c.borrow_mut().take())
        .unwrap_or_default();
    (result, memories)
}

/// The engine's memory creator.
pub struct Creator;

/// A mapping: reserved whole, readable and writable up to `size`.
struct Mapping {
    base: usize,
    mapped: usize,
    size: Arc<AtomicUsize>,
    capacity: usize,
}

// The raw base is only dereferenced by wasmtime's compiled code and by the host between
// calls; the mapping itself is plain memory.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.mapped);
        }
    }
}

unsafe impl LinearMemory for Mapping {
    fn byte_size(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }

    fn byte_capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        let old = self.byte_size();
        if new_size > self.capacity {
            return Err(wasmtime::Error::msg(format!(
                "cannot grow a memory past its reservation of {} bytes",
                self.capacity
            )));
        }
        if new_size > old {
            let page = page_size();
            let from = old / page * page;
            let rc = unsafe {
                libc::mprotect(
                    (self.base + from) as *mut libc::c_void,
                    new_size.div_ceil(page) * page - from,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if rc != 0 {
                return Err(wasmtime::Error::msg(format!(
                    "cannot make {new_size} bytes of a memory writable: {}",
                    std::io::Error::last_os_error()
                )));
            }
            self.size.store(new_size, Ordering::Release);
        }
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

/// Reserve 4 GiB for a memory that says nothing of its largest size (32-bit memories
/// can address no more; a 64-bit one past this fails to grow, as the guest would see
/// at a limit).
const DEFAULT_RESERVATION: usize = 4 << 30;

unsafe impl MemoryCreator for Creator {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if ty.is_shared() {
            return Err("wasnap does not snapshot shared memories".into());
        }
        let capacity = reserved_size_in_bytes
            .unwrap_or_else(|| maximum.unwrap_or(DEFAULT_RESERVATION))
            .max(minimum);
        let page = page_size();
        let mapped = (capacity.div_ceil(page) * page)
            .checked_add(guard_size_in_bytes.div_ceil(page) * page)
            .ok_or("a memory reservation overflows")?;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "cannot reserve {mapped} bytes for a memory: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut mapping = Mapping {
            base: base as usize,
            mapped,
            size: Arc::new(AtomicUsize::new(0)),
            capacity,
        };
        mapping.grow_to(minimum).map_err(|e| e.to_string())?;
        COLLECTING.with(|c| {
            if let Some(list) = c.borrow_mut().as_mut() {
                list.push(Arc::new(HostMemory {
                    base: mapping.base,
                    size: mapping.size.clone(),
                    capacity,
                    ty,
                }));
            }
        });
        Ok(Box::new(mapping))
    }
}
