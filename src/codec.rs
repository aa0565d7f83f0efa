//! Little-endian integers and LEB128 varints for the store formats and the opaque
//! positions and markers of streams. Every read is bounds-checked and fails with a
//! `Corrupt` error, never a panic: store objects are untrusted input.

use anyhow::Result;

use crate::error::corrupt;

pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    /// `what` names the object in errors ("manifest manifests/…").
    pub fn new(bytes: &'a [u8], what: &'a str) -> Self {
        Self {
            bytes,
            pos: 0,
            what,
        }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(corrupt!(
                "{} is truncated: needs {n} bytes at offset {}, has {}",
                self.what,
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N)?.try_into().expect("length checked"))
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// An unsigned LEB128 varint of at most 10 bytes.
    pub fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if shift == 63 && byte > 1 {
                    break;
                }
                return Ok(value);
            }
        }
        Err(corrupt!(
            "{} is corrupt: a varint overflows 64 bits",
            self.what
        ))
    }

    /// A varint that must fit in a `u32`.
    pub fn varint_u32(&mut self) -> Result<u32> {
        let v = self.varint()?;
        u32::try_from(v).map_err(|_| corrupt!("{} is corrupt: {v} does not fit 32 bits", self.what))
    }

    /// A varint count of items that each take at least `min_item_bytes` (refuses counts the rest of the object could not possibly hold, so a flipped bit
    /// cannot ask for a huge allocation).
    pub fn varint_count(&mut self, min_item_bytes: usize) -> Result<usize> {
        let n = usize::try_from(self.varint()?).unwrap_or(usize::MAX);
        if n.saturating_mul(min_item_bytes.max(1)) > self.remaining() {
            return Err(corrupt!(
                "{} is corrupt: a count of {n} does not fit in {} remaining bytes",
                self.what,
                self.remaining()
            ));
        }
        Ok(n)
    }

    pub fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(corrupt!(
                "{} is corrupt: {} unexpected trailing bytes",
                self.what,
                self.remaining()
            ));
        }
        Ok(())
    }
}

/// How many bytes `put_varint` writes for `v`.
pub fn varint_len(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).max(1).div_ceil(7)
}

/// Appending little-endian integers to a byte vector.
pub trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    /// Unsigned LEB128.
    fn put_varint(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.push(v as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_reject_overflow() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            let mut bytes = Vec::new();
            bytes.put_varint(v);
            assert_eq!(varint_len(v), bytes.len());
            let mut r = Reader::new(&bytes, "v");
            assert_eq!(r.varint().unwrap(), v);
            r.finish().unwrap();
        }
        let overflow = [0xff; 10];
        assert!(Reader::new(&overflow, "v").varint().is_err());
        let mut eleven = vec![0x80; 10];
        eleven.push(0);
        assert!(Reader::new(&eleven, "v").varint().is_err());
    }
}
