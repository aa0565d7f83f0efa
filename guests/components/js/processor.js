// The `processor` world (wit/processor.wit) in JavaScript, for componentize-js.
//
// Word counts kept twice, once in the guest's own memory (`counts`) and once in the host's
// kv store (get-state/put-state), plus a record counter. The Rust and Python guests beside
// this one implement the same logic byte for byte; ../README.md is the specification.

import { emit, emitWatermark } from 'functionstream:core/collector@0.1.0';
import { Store } from 'functionstream:core/kv@0.1.0';

const U64_MAX = (1n << 64n) - 1n;
// The ASCII whitespace of the spec: space, \t, \n, \r, \f and \v (String.prototype.trim
// and /\s/ would take Unicode spaces too).
const WS = /[ \t\n\r\f\v]+/;
const TRIM = /^[ \t\n\r\f\v]+|[ \t\n\r\f\v]+$/g;
const DIGITS = /^[0-9]+$/;
// Lossy like Rust's from_utf8_lossy and Python's 'replace' (one U+FFFD per maximal invalid
// subpart); ignoreBOM keeps a leading U+FEFF, which the other two keep as well.
const decoder = new TextDecoder('utf-8', { ignoreBOM: true });
const encoder = new TextEncoder();

// Module state lives in the guest's memory: it is part of the snapshot.
let records = 0;
const counts = new Map();
let store = null; // opened once in fsInit and kept across checkpoints

// Non-empty ASCII digits only (no sign, spaces or `_`) that fit a u64, as a BigInt, else null.
function parseDigits(s) {
  if (!DIGITS.test(s)) return null;
  const n = BigInt(s);
  return n <= U64_MAX ? n : null;
}

// `#watermark N` after trimming: the one space, then digits that fit a u64.
function watermark(text) {
  const t = text.replace(TRIM, '');
  if (!t.startsWith('#watermark ')) return null;
  return parseDigits(t.slice('#watermark '.length));
}

// A kv value as a count: absent, malformed or u64::MAX (no room for +1) reads as 0.
function storedCount(v) {
  if (v === undefined || v === null) return 0n;
  // Only ASCII digits are accepted, so decoding non-ASCII bytes cannot make a false match.
  const n = parseDigits(decoder.decode(v));
  return n !== null && n < U64_MAX ? n : 0n;
}

function progress() {
  if (records % 1000 === 0) console.error(`progress ${records}`);
}

function openStore() {
  if (store === null) throw new Error('the kv store is closed');
  return store;
}

export function fsInit(config) {
  let name = 'counts';
  for (const [k, v] of config) {
    if (k === 'store') {
      name = v;
      break;
    }
  }
  // A second fsInit drops the handle it had first, as fsClose does.
  fsClose();
  store = new Store(name);
  console.error('processor ready');
}

export function fsProcess(sourceId, data) {
  records += 1;
  const text = decoder.decode(data);
  const wm = watermark(text);
  if (wm !== null) {
    emitWatermark(0, wm);
  } else {
    let out = `${records}:`;
    for (const word of text.split(WS)) {
      if (word === '') continue;
      const m = (counts.get(word) ?? 0) + 1;
      counts.set(word, m);
      const key = encoder.encode(word);
      const s = openStore();
      const k = storedCount(s.getState(key)) + 1n;
      s.putState(key, encoder.encode(k.toString()));
      out += ` ${word}=${m}/${k}`;
    }
    emit(0, encoder.encode(out));
  }
  progress();
}

export function fsProcessWatermark(sourceId, wm) {
  emitWatermark(0, wm);
}

export function fsTakeCheckpoint(checkpointId) {}

export function fsCheckHeartbeat() {
  return true;
}

export function fsClose() {
  const s = store;
  store = null;
  // Drop the host resource now rather than whenever the object is collected.
  const dispose = s && (s[Symbol.dispose] ?? s[Symbol.for('dispose')]);
  if (dispose) dispose.call(s);
}

export function fsExec(className, payload) {}

export function fsCustom(payload) {
  return encoder.encode(`${records}`);
}
