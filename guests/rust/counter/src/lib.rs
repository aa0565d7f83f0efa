//! Counter: the smallest useful state, a record count and a running byte total in two
//! statics. A checkpoint of this guest is almost all manifest, so it shows the fixed cost.
//! Emits `<records> <bytes so far>` for every record.

#[link(wasm_import_module = "wasnap")]
unsafe extern "C" {
    fn emit(ptr: *const u8, len: usize);
}

static mut INPUT: [u8; 4096] = [0; 4096];
static mut RECORDS: u64 = 0;
static mut BYTES: u64 = 0;

#[unsafe(no_mangle)]
pub extern "C" fn alloc(len: usize) -> *mut u8 {
    // Records longer than the buffer are counted but not kept.
    let _ = len;
    &raw mut INPUT as *mut u8
}

#[unsafe(no_mangle)]
pub extern "C" fn process(_ptr: *const u8, len: usize) {
    let mut line = [0u8; 48];
    let n = unsafe {
        RECORDS += 1;
        BYTES += len as u64;
        write_decimal(&mut line, 0, RECORDS)
    };
    line[n] = b' ';
    let n = unsafe { write_decimal(&mut line, n + 1, BYTES) };
    unsafe { emit(line.as_ptr(), n) }
}

fn write_decimal(buf: &mut [u8], at: usize, mut v: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    buf[at..at + len].copy_from_slice(&digits[i..]);
    at + len
}
