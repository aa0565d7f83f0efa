// Word count in AssemblyScript: a `Map<string, i32>` of words, managed by AssemblyScript's
// incremental GC (allocator and collector state in non-exported mutable globals).
//
// For each record it emits `<word> <count so far>` for every space-separated word; every
// 500th record also emits the vocabulary size.

@external("wasnap", "emit")
declare function emit(ptr: usize, len: i32): void;

const counts = new Map<string, i32>();
let records: i32 = 0;

function out(line: string): void {
  const buf = String.UTF8.encode(line);
  emit(changetype<usize>(buf), buf.byteLength);
}

export function alloc(len: i32): usize {
  return heap.alloc(<usize>max(len, 1));
}

export function process(ptr: usize, len: i32): void {
  const line = String.UTF8.decodeUnsafe(ptr, <usize>len);
  heap.free(ptr);
  records++;
  const words = line.split(" ");
  for (let i = 0; i < words.length; i++) {
    const word = words[i];
    if (word.length == 0) continue;
    const count = (counts.has(word) ? counts.get(word) : 0) + 1;
    counts.set(word, count);
    out(word + " " + count.toString());
  }
  if (records % 500 == 0) {
    out("# records=" + records.toString() + " vocabulary=" + counts.size.toString());
  }
}

export function abort(message: string | null, file: string | null, line: u32, column: u32): void {
  unreachable();
}
