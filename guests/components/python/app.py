"""The `processor` world (wit/processor.wit) in Python, for componentize-py.

Word counts kept twice, once in the guest's own memory (`counts`) and once in the host's
kv store (get-state/put-state), plus a record counter. The Rust and JavaScript guests
beside this one implement the same logic byte for byte; ../README.md is the specification.
"""

import sys

import wit_world
from wit_world.imports import collector, kv

# The ASCII whitespace of the spec: space, \t, \n, \r, \f and \v (str.split() with no
# argument would also split on Unicode spaces and \x1c-\x1f).
_WS = " \t\n\r\f\v"
_TO_SPACE = str.maketrans(_WS, " " * len(_WS))
_U64_MAX = (1 << 64) - 1

# False only in the --stub-wasi build (see app_stubwasi.py): there every WASI function
# traps, stderr included.
STDERR = True

# Module globals live in the guest's memory: they are part of its state.
records = 0
counts = {}
store = None  # kv.Store, opened once in fs_init and kept across checkpoints


def _parse_digits(s):
    """Non-empty ASCII digits only (no sign, spaces or `_`) that fit a u64, else None."""
    if not s or any(c not in b"0123456789" for c in s):
        return None
    n = int(s)
    return n if n <= _U64_MAX else None


def _watermark(text):
    """`#watermark N` after trimming: the one space, then digits that fit a u64."""
    t = text.strip(_WS)
    if not t.startswith("#watermark "):
        return None
    return _parse_digits(t[len("#watermark "):].encode("utf-8"))


def _stored_count(v):
    """A kv value as a count: absent, malformed or u64::MAX (no room for +1) reads as 0."""
    n = _parse_digits(v) if v is not None else None
    return n if n is not None and n < _U64_MAX else 0


def _stderr_line(line):
    if STDERR:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _progress():
    if records % 1000 == 0:
        _stderr_line(f"progress {records}")


def _store():
    if store is None:
        raise RuntimeError("the kv store is closed")
    return store


class WitWorld(wit_world.WitWorld):
    def fs_init(self, config):
        global store
        name = "counts"
        for k, v in config:
            if k == "store":
                name = v
                break
        # A second fs_init drops the handle it had first, as fs_close does.
        self.fs_close()
        store = kv.Store(name)
        _stderr_line("processor ready")

    def fs_process(self, source_id, data):
        global records
        records += 1
        text = bytes(data).decode("utf-8", "replace")
        wm = _watermark(text)
        if wm is not None:
            collector.emit_watermark(0, wm)
        else:
            out = [f"{records}:"]
            for word in text.translate(_TO_SPACE).split(" "):
                if not word:
                    continue
                m = counts.get(word, 0) + 1
                counts[word] = m
                key = word.encode("utf-8")
                s = _store()
                k = _stored_count(s.get_state(key)) + 1
                s.put_state(key, str(k).encode("ascii"))
                out.append(f" {word}={m}/{k}")
            collector.emit(0, "".join(out).encode("utf-8"))
        _progress()

    def fs_process_watermark(self, source_id, watermark):
        collector.emit_watermark(0, watermark)

    def fs_take_checkpoint(self, checkpoint_id):
        pass

    def fs_check_heartbeat(self):
        return True

    def fs_close(self):
        global store
        s, store = store, None
        if s is not None:
            # Drop the host resource now rather than whenever the object is collected.
            s.__exit__(None, None, None)

    def fs_exec(self, class_name, payload):
        pass

    def fs_custom(self, payload):
        return str(records).encode("ascii")
