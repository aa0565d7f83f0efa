// Inventory counter in AssemblyScript: a `Map<string, i32>`, arrays and strings, all
// managed by AssemblyScript's incremental GC.
//
// State: the map, its string keys and an array of recent items live on the GC heap in
// linear memory; the allocator's and the collector's own state (heap top, free lists,
// GC phase, roots) live in NON-exported mutable globals. A restore that skipped the
// globals would hand out memory the map still uses.
//
// A record is `<item> <delta>` (a bare word means +1). For each record it emits
// `<item> <stock> <distinct items> <records>`; every 100th record also emits the five
// most recently changed items.

@external("wasnap", "emit")
declare function emit(ptr: usize, len: i32): void;

const stock = new Map<string, i32>();
const recent = new Array<string>();
let records: i32 = 0;

function out(line: string): void {
  const buf = String.UTF8.encode(line);
  emit(changetype<usize>(buf), buf.byteLength);
}

// The record ABI: the host writes the record into raw memory we hand out, then calls
// process, which frees it.
export function alloc(len: i32): usize {
  return heap.alloc(<usize>max(len, 1));
}

export function process(ptr: usize, len: i32): void {
  const line = String.UTF8.decodeUnsafe(ptr, <usize>len);
  heap.free(ptr);
  records++;
  const space = line.indexOf(" ");
  const item = space < 0 ? line : line.substring(0, space);
  let delta = 1;
  if (space >= 0) {
    const rest = line.substring(space + 1);
    const c = rest.charCodeAt(0);
    if ((c >= 48 && c <= 57) || c == 45) delta = I32.parseInt(rest);
  }
  const now = (stock.has(item) ? stock.get(item) : 0) + delta;
  stock.set(item, now);
  recent.push(item);
  if (recent.length > 64) recent.shift();
  out(item + " " + now.toString() + " " + stock.size.toString() + " " + records.toString());
  if (records % 100 == 0) {
    const last = recent.slice(recent.length - 5 < 0 ? 0 : recent.length - 5);
    out("# recent " + last.join(","));
  }
}

// Called by the runtime on a failed assertion or bounds check: trap, do not import env.abort.
export function abort(message: string | null, file: string | null, line: u32, column: u32): void {
  unreachable();
}
