;; A hand-written guest whose whole logical state sits in NON-exported mutable globals,
;; and whose memory grows while it runs.
;;
;; State: $count, $hash (FNV-1a over every record so far), $log_end and $longest are
;; mutable globals the guest does not export; every record is appended to a log in
;; linear memory starting at byte 1024, and `alloc` grows the memory a page at a time as
;; the log fills it. A restore that forgot the globals would restart the count and the
;; hash, and overwrite the log.
;;
;; For each record it emits: `<count> <hash as 16 hex digits> <memory pages> <longest record>`.
(module
  (import "wasnap" "emit" (func $emit (param i32 i32)))
  (memory (export "memory") 1)

  (global $count (mut i64) (i64.const 0))
  (global $hash (mut i64) (i64.const 0xcbf29ce484222325))
  (global $log_end (mut i32) (i32.const 1024))
  (global $longest (mut i32) (i32.const 0))

  ;; Bytes 0..128: the output line being formatted; 128..240: scratch for digits.

  ;; The next record goes at the end of the log; make room for it first.
  (func (export "alloc") (param $len i32) (result i32)
    (local $need i32)
    (local.set $need (i32.add (global.get $log_end) (local.get $len)))
    (block $done
      (loop $grow
        (br_if $done (i32.le_u (local.get $need) (i32.mul (memory.size) (i32.const 65536))))
        (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
        (br $grow)))
    (global.get $log_end))

  (func (export "process") (param $ptr i32) (param $len i32)
    (local $i i32)
    (local $h i64)
    (local $p i32)
    (local.set $h (global.get $hash))
    (block $end
      (loop $bytes
        (br_if $end (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $h
          (i64.mul
            (i64.xor (local.get $h) (i64.load8_u (i32.add (local.get $ptr) (local.get $i))))
            (i64.const 0x100000001b3)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $bytes)))
    (global.set $hash (local.get $h))
    (global.set $count (i64.add (global.get $count) (i64.const 1)))
    ;; The record stays in the log: alloc put it at $log_end.
    (global.set $log_end (i32.add (global.get $log_end) (local.get $len)))
    (if (i32.gt_u (local.get $len) (global.get $longest))
      (then (global.set $longest (local.get $len))))

    (local.set $p (call $put_u64 (i32.const 0) (global.get $count)))
    (local.set $p (call $put_byte (local.get $p) (i32.const 32)))
    (local.set $p (call $put_hex (local.get $p) (global.get $hash)))
    (local.set $p (call $put_byte (local.get $p) (i32.const 32)))
    (local.set $p (call $put_u64 (local.get $p) (i64.extend_i32_u (memory.size))))
    (local.set $p (call $put_byte (local.get $p) (i32.const 32)))
    (local.set $p (call $put_u64 (local.get $p) (i64.extend_i32_u (global.get $longest))))
    (call $emit (i32.const 0) (local.get $p)))

  (func $put_byte (param $p i32) (param $b i32) (result i32)
    (i32.store8 (local.get $p) (local.get $b))
    (i32.add (local.get $p) (i32.const 1)))

  ;; Decimal digits of $v at $p; returns the position after them.
  (func $put_u64 (param $p i32) (param $v i64) (result i32)
    (local $t i32)
    (local.set $t (i32.const 240))
    (loop $digits
      (local.set $t (i32.sub (local.get $t) (i32.const 1)))
      (i32.store8 (local.get $t)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digits (i64.ne (local.get $v) (i64.const 0))))
    (block $copied
      (loop $copy
        (br_if $copied (i32.ge_u (local.get $t) (i32.const 240)))
        (local.set $p (call $put_byte (local.get $p) (i32.load8_u (local.get $t))))
        (local.set $t (i32.add (local.get $t) (i32.const 1)))
        (br $copy)))
    (local.get $p))

  ;; 16 lowercase hex digits of $v at $p; returns the position after them.
  (func $put_hex (param $p i32) (param $v i64) (result i32)
    (local $shift i64)
    (local $nibble i32)
    (local.set $shift (i64.const 60))
    (loop $digits
      (local.set $nibble
        (i32.wrap_i64 (i64.and (i64.shr_u (local.get $v) (local.get $shift)) (i64.const 15))))
      (local.set $p
        (call $put_byte (local.get $p)
          (i32.add (local.get $nibble)
            (select (i32.const 48) (i32.const 87) (i32.lt_u (local.get $nibble) (i32.const 10))))))
      (local.set $shift (i64.sub (local.get $shift) (i64.const 4)))
      (br_if $digits (i64.ge_s (local.get $shift) (i64.const 0))))
    (local.get $p))
)
