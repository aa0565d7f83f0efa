// Build processor.js into a component of the `processor` world (wit/processor.wit).
// Usage: node build.mjs OUT.wasm   (scripts/build-guests.sh calls it)
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const out = process.argv[2];
if (!out) throw new Error('usage: node build.mjs OUT.wasm');

const { component } = await componentize({
  sourcePath: here('./processor.js'),
  witPath: here('../../../wit/processor.wit'),
  worldName: 'processor',
  // As little WASI as the engine allows: no randomness, clocks or HTTP. `stdio` stays, for
  // console.error's stderr lines (the ones a checkpoint test expects after a restore).
  disableFeatures: ['random', 'clocks', 'http', 'fetch-event'],
});
await writeFile(out, component);
