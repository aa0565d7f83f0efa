//! What a checkpoint holds of a guest, as plain data: memories cut into 64 KiB pages, and
//! the values of mutable globals. A leaf that the guest, snapshot and store stages all
//! speak, so none of them needs another to name a page or a global.

/// Bytes per page: the unit memories are hashed, diffed, stored and restored in. A
/// host-side constant, independent of the wasm page size, so 64-bit memories and custom
/// page sizes are handled alike.
pub const PAGE_SIZE: usize = 64 * 1024;

/// How many pages a memory of `byte_len` bytes has (the last one may be short).
pub fn page_count(byte_len: u64) -> usize {
    byte_len.div_ceil(PAGE_SIZE as u64) as usize
}

/// The value type of a mutable global the engine snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalKind {
    I32,
    I64,
    F32,
    F64,
    V128,
}

/// The value of one mutable global, as written into a manifest (floats as their bits).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GlobalValue {
    I32(i32),
    I64(i64),
    F32(u32),
    F64(u64),
    V128(u128),
}

impl GlobalValue {
    pub fn kind(&self) -> GlobalKind {
        match self {
            GlobalValue::I32(_) => GlobalKind::I32,
            GlobalValue::I64(_) => GlobalKind::I64,
            GlobalValue::F32(_) => GlobalKind::F32,
            GlobalValue::F64(_) => GlobalKind::F64,
            GlobalValue::V128(_) => GlobalKind::V128,
        }
    }
}
