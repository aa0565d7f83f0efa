//! Dense deltas, word by word over the whole page: XOR (encoding 2) for bytes changed in
//! place, and wrapping subtraction of 32-bit little-endian words (encoding 4, read only)
//! for counters that grew. zstd then codes the runs of zeros.

/// `dst ^= src`, a word at a time. Its own inverse.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let x = u64::from_ne_bytes(d.try_into().expect("8 bytes"))
            ^ u64::from_ne_bytes(s.try_into().expect("8 bytes"));
        d.copy_from_slice(&x.to_ne_bytes());
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d ^= s;
    }
}

/// `dst -= src`, as little-endian 32-bit words (wrapping); a tail of under 4 bytes byte
/// by byte. The inverse of [`add_words`].
pub fn sub_words(dst: &mut [u8], src: &[u8]) {
    word_op(dst, src, u32::wrapping_sub, u8::wrapping_sub)
}

/// `dst += src`, as little-endian 32-bit words (wrapping); the inverse of [`sub_words`].
pub fn add_words(dst: &mut [u8], src: &[u8]) {
    word_op(dst, src, u32::wrapping_add, u8::wrapping_add)
}

fn word_op(dst: &mut [u8], src: &[u8], word: fn(u32, u32) -> u32, byte: fn(u8, u8) -> u8) {
    let mut d = dst.chunks_exact_mut(4);
    let mut s = src.chunks_exact(4);
    for (d, s) in (&mut d).zip(&mut s) {
        let x = word(
            u32::from_le_bytes(d.try_into().expect("4 bytes")),
            u32::from_le_bytes(s.try_into().expect("4 bytes")),
        );
        d.copy_from_slice(&x.to_le_bytes());
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = byte(*d, *s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtraction_makes_grown_counters_small_and_addition_undoes_it() {
        // Counters (u32 LE) that each grew by 1, on a page with a 3-byte tail.
        let old: Vec<u8> = (0..16_385u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes())
            .take(65_539)
            .collect();
        let mut new = old.clone();
        for word in new.chunks_exact_mut(4) {
            let grown = u32::from_le_bytes(word.try_into().unwrap()).wrapping_add(1);
            word.copy_from_slice(&grown.to_le_bytes());
        }
        new[65_538] = new[65_538].wrapping_add(7);
        let mut delta = new.clone();
        sub_words(&mut delta, &old);
        assert!(delta.chunks_exact(4).all(|w| w == [1, 0, 0, 0]));
        assert_eq!(&delta[65_536..], &[0, 0, 7]);
        let mut back = old.clone();
        add_words(&mut back, &delta);
        assert_eq!(back, new);
    }

    #[test]
    fn xor_is_its_own_inverse_with_an_odd_tail() {
        let old: Vec<u8> = (0..1_003u32).map(|i| (i * 7) as u8).collect();
        let new: Vec<u8> = (0..1_003u32).map(|i| (i * 13 + 1) as u8).collect();
        let mut delta = new.clone();
        xor_into(&mut delta, &old);
        xor_into(&mut delta, &old);
        assert_eq!(delta, new);
    }
}
