//! Zigzag LEB128 varints, the length and delta encoding inside record batches.
//!
//! A signed value is zigzag-mapped (`0, -1, 1, -2, …` → `0, 1, 2, 3, …`) and written in
//! groups of 7 bits, least significant first, the high bit of each byte meaning "more
//! follows". At most [`VARINT_LEN_MAX`] bytes; a longer or overflowing run is an error,
//! never a panic or a silent wrap.

use crate::error::DecodeError;
use crate::limits::VARINT_LEN_MAX;

/// Appends `value` to `dst` as a zigzag varint.
pub fn put_varint(dst: &mut impl bytes::BufMut, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        dst.put_u8((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    dst.put_u8(zigzag as u8);
}

/// How many bytes [`put_varint`] writes for `value`.
pub fn varint_len(value: i64) -> usize {
    let zigzag = ((value << 1) ^ (value >> 63)) as u64;
    let bits = 64 - zigzag.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// Reads a zigzag varint from `src[pos..]`. Returns the value and the position after it.
///
/// `pos` is also the offset reported in errors, so callers pass absolute positions.
pub fn get_varint(src: &[u8], pos: usize) -> Result<(i64, usize), DecodeError> {
    let mut zigzag: u64 = 0;
    for i in 0..VARINT_LEN_MAX {
        let Some(&byte) = src.get(pos + i) else {
            return Err(DecodeError::Truncated { offset: pos + i, need: 1, have: 0 });
        };
        let group = u64::from(byte & 0x7f);
        // The tenth byte may only carry the single remaining bit of a u64.
        if i == VARINT_LEN_MAX - 1 && (byte & 0x7e) != 0 {
            return Err(DecodeError::BadVarint { offset: pos });
        }
        zigzag |= group << (7 * i);
        if byte & 0x80 == 0 {
            let value = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
            return Ok((value, pos + i + 1));
        }
    }
    Err(DecodeError::BadVarint { offset: pos })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_round_trips_and_reports_its_length(value in any::<i64>()) {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            prop_assert_eq!(buf.len(), varint_len(value));
            prop_assert_eq!(get_varint(&buf, 0).unwrap(), (value, buf.len()));
        }
    }

    #[test]
    fn varint_of_eleven_continuation_bytes_is_rejected_with_its_offset() {
        let buf = [0xffu8; 11];
        assert_eq!(get_varint(&buf, 0), Err(DecodeError::BadVarint { offset: 0 }));
    }

    #[test]
    fn varint_overflowing_64_bits_in_the_tenth_byte_is_rejected() {
        let mut buf = [0xffu8; 10];
        buf[9] = 0x02;
        assert_eq!(get_varint(&buf, 0), Err(DecodeError::BadVarint { offset: 0 }));
    }

    #[test]
    fn varint_cut_short_reports_where_it_ran_out() {
        let buf = [0x80u8, 0x80];
        assert_eq!(get_varint(&buf, 0), Err(DecodeError::Truncated { offset: 2, need: 1, have: 0 }));
    }
}
