//! Registers and bits to typed values, and back.
//!
//! # Rules
//!
//! - **Widths.** [`decode`] takes exactly [`DataType::width`] registers; any other length is a
//!   [`DecodeError::Length`], never a panic. [`decode_bit`] takes exactly one bit.
//! - **Byte order.** The registers of a value are laid out as bytes on the wire (high byte of
//!   each register first) and permuted back to the big-endian value `A B C D` (or
//!   `A B C D E F G H`) by the tag's [`ByteOrder`]:
//!   `Abcd` = identity, `Badc` = bytes swapped within each register, `Cdab` = register order
//!   reversed, `Dcba` = all bytes reversed. The same rule applies to single-register integers
//!   (`Badc` and `Dcba` swap the two bytes; `Cdab` leaves them alone), so a device default of
//!   `Dcba` means "little endian" for every numeric type. Each permutation is its own inverse,
//!   which is what makes [`encode`] the exact inverse of [`decode`].
//! - **Strings** are 2 bytes per register, high byte first, whatever the byte order; trailing
//!   NUL bytes and spaces are trimmed; bytes that are not UTF-8 are a
//!   [`DecodeError::InvalidString`].
//! - **Bools.** A coil or discrete input is its bit. In a register table, a bool is bit
//!   [`TagSpec::bit`] (0 = least significant) of the register value, or, without a bit,
//!   "register is not zero". Byte order does not apply to bits.
//! - **Scaling.** `value = raw * scale + offset`. When `scale == 1` and `offset == 0` integers
//!   stay exact: signed types give [`Value::Int`], unsigned types (`uint16`, `uint32`, `uint64`)
//!   always give [`Value::UInt`] (the documented meaning of `UInt`: "declared unsigned").
//!   Otherwise the result is [`Value::Float`] (64-bit integers lose precision above 2^53).
//!   Floats always give [`Value::Float`]; NaN and infinities are passed through unchanged (a
//!   PLC may use NaN as "no value"), scaled or not. Bools and strings ignore scale and offset.
//! - **Encoding** inverts all of the above: `raw = (value - offset) / scale`, rounded to the
//!   nearest integer (ties away from zero, [`f64::round`]) for integer types, range-checked
//!   against the type, NaN and infinities refused for integer types. Integer values with
//!   `scale == 1` and `offset == 0` are converted exactly (no trip through `f64`). `float32`
//!   rounds to the nearest `f32`; a finite value too large for `f32` is an error.

use edgesync_protocol::Value;

use crate::model::{ByteOrder, DataType, Table, TagSpec};

/// Why registers or bits could not be decoded into a tag's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The number of registers (or bits) does not match the type's width.
    #[error("expected {expected} registers or bits, got {got}")]
    Length {
        /// The width of the type.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// The tag asks for a register bit above 15.
    #[error("bit {bit} is outside a 16-bit register")]
    BitOutOfRange {
        /// The requested bit.
        bit: u8,
    },
    /// The string bytes are not UTF-8.
    #[error("string registers do not hold valid utf-8")]
    InvalidString,
    /// The tag's type cannot live in the table it is being decoded from (e.g. an int32 coil).
    #[error("a {table} tag cannot have a non-bool type")]
    WrongTable {
        /// The table of the data given.
        table: &'static str,
    },
}

/// Why a value could not be encoded into a tag's registers or bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The value's kind does not fit the tag's type (e.g. a string for an int16).
    #[error("a {got} value cannot be written to a {expected} tag")]
    WrongType {
        /// The tag's type.
        expected: &'static str,
        /// The kind of value given.
        got: &'static str,
    },
    /// After removing offset and scale, the value is outside the type's range.
    #[error("value {value} is out of range for {data_type}")]
    OutOfRange {
        /// The raw value (after `(value - offset) / scale`).
        value: String,
        /// The tag's type.
        data_type: &'static str,
    },
    /// NaN or infinity for an integer type.
    #[error("value {value} is not a finite number")]
    NotFinite {
        /// The value.
        value: String,
    },
    /// The tag's scale is zero (or not finite), so no raw value maps to the requested value.
    #[error("scale {scale} cannot be inverted")]
    BadScale {
        /// The scale.
        scale: String,
    },
    /// The string is longer than the tag's registers hold.
    #[error("string of {len} bytes does not fit in {max} bytes")]
    StringTooLong {
        /// The string's length in bytes.
        len: usize,
        /// The capacity (2 bytes per register).
        max: usize,
    },
    /// A bool in a register bit cannot be written as a whole register; use
    /// [`encode_bit_mask`] (function 0x16) or a read-modify-write.
    #[error("a register bit must be written with a masked write")]
    RegisterBit,
    /// The tag asks for a register bit above 15.
    #[error("bit {bit} is outside a 16-bit register")]
    BitOutOfRange {
        /// The requested bit.
        bit: u8,
    },
    /// The tag's table does not suit this encoder (e.g. [`encode`] for a coil).
    #[error("a {table} tag cannot be encoded this way")]
    WrongTable {
        /// The tag's table.
        table: &'static str,
    },
}

/// The stable lowercase name of a data type (used in errors and logs).
pub fn type_name(t: &DataType) -> &'static str {
    match t {
        DataType::Bool => "bool",
        DataType::Int16 => "int16",
        DataType::UInt16 => "uint16",
        DataType::Int32 => "int32",
        DataType::UInt32 => "uint32",
        DataType::Int64 => "int64",
        DataType::UInt64 => "uint64",
        DataType::Float32 => "float32",
        DataType::Float64 => "float64",
        DataType::String { .. } => "string",
    }
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::UInt(_) => "uint",
        Value::Float(_) => "float",
        Value::Str(_) => "string",
    }
}

/// Permutes wire bytes (register by register, high byte first) into big-endian order, or back:
/// every permutation used here is an involution.
fn permute<const N: usize>(bytes: [u8; N], order: ByteOrder) -> [u8; N] {
    let mut out = bytes;
    match order {
        ByteOrder::Abcd => {}
        ByteOrder::Badc => {
            for pair in out.chunks_exact_mut(2) {
                pair.swap(0, 1);
            }
        }
        ByteOrder::Cdab => {
            let regs = N / 2;
            for r in 0..regs {
                out[2 * r] = bytes[2 * (regs - 1 - r)];
                out[2 * r + 1] = bytes[2 * (regs - 1 - r) + 1];
            }
        }
        ByteOrder::Dcba => out.reverse(),
    }
    out
}

/// The big-endian bytes of the value held in `regs` (exactly `N / 2` registers).
fn regs_to_be<const N: usize>(regs: &[u16], order: ByteOrder) -> Result<[u8; N], DecodeError> {
    if regs.len() * 2 != N {
        return Err(DecodeError::Length {
            expected: N / 2,
            got: regs.len(),
        });
    }
    let mut wire = [0u8; N];
    for (chunk, reg) in wire.chunks_exact_mut(2).zip(regs) {
        chunk.copy_from_slice(&reg.to_be_bytes());
    }
    Ok(permute(wire, order))
}

/// The registers holding the big-endian bytes `be`.
fn be_to_regs<const N: usize>(be: [u8; N], order: ByteOrder) -> Vec<u16> {
    permute(be, order)
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

fn is_identity(tag: &TagSpec) -> bool {
    tag.scale == 1.0 && tag.offset == 0.0
}

fn scaled(tag: &TagSpec, raw: f64) -> Value {
    if is_identity(tag) {
        // No arithmetic: keeps NaN payloads and the sign of zero bit-exact.
        Value::Float(raw)
    } else {
        Value::Float(raw * tag.scale + tag.offset)
    }
}

fn int_value(tag: &TagSpec, raw: i64) -> Value {
    if is_identity(tag) {
        Value::Int(raw)
    } else {
        scaled(tag, raw as f64)
    }
}

fn uint_value(tag: &TagSpec, raw: u64) -> Value {
    if is_identity(tag) {
        Value::UInt(raw)
    } else {
        scaled(tag, raw as f64)
    }
}

/// Decodes the registers of a tag in a register table (`regs.len()` must equal the type's
/// width). See the module docs for the rules.
pub fn decode(tag: &TagSpec, regs: &[u16]) -> Result<Value, DecodeError> {
    let order = tag.byte_order;
    match tag.data_type {
        DataType::Bool => {
            let [reg] = regs else {
                return Err(DecodeError::Length {
                    expected: 1,
                    got: regs.len(),
                });
            };
            match tag.bit {
                Some(bit) if bit > 15 => Err(DecodeError::BitOutOfRange { bit }),
                Some(bit) => Ok(Value::Bool(reg >> bit & 1 == 1)),
                None => Ok(Value::Bool(*reg != 0)),
            }
        }
        DataType::Int16 => {
            let be: [u8; 2] = regs_to_be(regs, order)?;
            Ok(int_value(tag, i64::from(i16::from_be_bytes(be))))
        }
        DataType::UInt16 => {
            let be: [u8; 2] = regs_to_be(regs, order)?;
            Ok(uint_value(tag, u64::from(u16::from_be_bytes(be))))
        }
        DataType::Int32 => {
            let be: [u8; 4] = regs_to_be(regs, order)?;
            Ok(int_value(tag, i64::from(i32::from_be_bytes(be))))
        }
        DataType::UInt32 => {
            let be: [u8; 4] = regs_to_be(regs, order)?;
            Ok(uint_value(tag, u64::from(u32::from_be_bytes(be))))
        }
        DataType::Int64 => {
            let be: [u8; 8] = regs_to_be(regs, order)?;
            Ok(int_value(tag, i64::from_be_bytes(be)))
        }
        DataType::UInt64 => {
            let be: [u8; 8] = regs_to_be(regs, order)?;
            Ok(uint_value(tag, u64::from_be_bytes(be)))
        }
        DataType::Float32 => {
            let be: [u8; 4] = regs_to_be(regs, order)?;
            Ok(scaled(tag, f64::from(f32::from_be_bytes(be))))
        }
        DataType::Float64 => {
            let be: [u8; 8] = regs_to_be(regs, order)?;
            Ok(scaled(tag, f64::from_be_bytes(be)))
        }
        DataType::String { len } => {
            if regs.len() != usize::from(len) {
                return Err(DecodeError::Length {
                    expected: usize::from(len),
                    got: regs.len(),
                });
            }
            let mut bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
            while matches!(bytes.last(), Some(0 | b' ')) {
                bytes.pop();
            }
            String::from_utf8(bytes)
                .map(Value::Str)
                .map_err(|_| DecodeError::InvalidString)
        }
    }
}

/// Decodes a tag in a bit table (coil or discrete input) from its bit (`bits.len()` must be 1).
pub fn decode_bit(tag: &TagSpec, bits: &[bool]) -> Result<Value, DecodeError> {
    if tag.data_type != DataType::Bool {
        return Err(DecodeError::WrongTable {
            table: tag.table.as_str(),
        });
    }
    match bits {
        [b] => Ok(Value::Bool(*b)),
        _ => Err(DecodeError::Length {
            expected: 1,
            got: bits.len(),
        }),
    }
}

/// Reads a bool out of a value: `Bool`, or a number that is exactly 0 or 1.
fn as_bool(value: &Value) -> Result<bool, EncodeError> {
    let wrong = || EncodeError::WrongType {
        expected: "bool",
        got: value_kind(value),
    };
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Int(0) | Value::UInt(0) => Ok(false),
        Value::Int(1) | Value::UInt(1) => Ok(true),
        Value::Float(f) if *f == 0.0 => Ok(false),
        Value::Float(f) if *f == 1.0 => Ok(true),
        _ => Err(wrong()),
    }
}

/// The raw integer a value stands for, for an integer type with range `[min, max]` (as i128).
fn raw_integer(tag: &TagSpec, value: &Value, min: i128, max: i128) -> Result<i128, EncodeError> {
    let name = type_name(&tag.data_type);
    let out_of_range = |v: String| EncodeError::OutOfRange {
        value: v,
        data_type: name,
    };
    let exact = match value {
        Value::Int(i) if is_identity(tag) => Some(i128::from(*i)),
        Value::UInt(u) if is_identity(tag) => Some(i128::from(*u)),
        Value::Bool(_) | Value::Str(_) => {
            return Err(EncodeError::WrongType {
                expected: name,
                got: value_kind(value),
            });
        }
        _ => None,
    };
    let raw = match exact {
        Some(raw) => raw,
        None => {
            let v = value.as_f64().ok_or(EncodeError::WrongType {
                expected: name,
                got: value_kind(value),
            })?;
            if !v.is_finite() {
                return Err(EncodeError::NotFinite {
                    value: v.to_string(),
                });
            }
            if tag.scale == 0.0 || !tag.scale.is_finite() {
                return Err(EncodeError::BadScale {
                    scale: tag.scale.to_string(),
                });
            }
            let r = ((v - tag.offset) / tag.scale).round();
            if !r.is_finite() {
                return Err(EncodeError::NotFinite {
                    value: r.to_string(),
                });
            }
            // Every type here fits in ±2^64, far inside i128; compare before converting.
            if r < min as f64 || r > max as f64 {
                return Err(out_of_range(r.to_string()));
            }
            r as i128
        }
    };
    if raw < min || raw > max {
        return Err(out_of_range(raw.to_string()));
    }
    Ok(raw)
}

/// The raw float a value stands for (`(value - offset) / scale`); NaN and infinities pass.
fn raw_float(tag: &TagSpec, value: &Value) -> Result<f64, EncodeError> {
    let v = match value {
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => value.as_f64().unwrap_or(f64::NAN),
        _ => {
            return Err(EncodeError::WrongType {
                expected: type_name(&tag.data_type),
                got: value_kind(value),
            });
        }
    };
    if is_identity(tag) {
        return Ok(v);
    }
    if tag.scale == 0.0 || !tag.scale.is_finite() {
        return Err(EncodeError::BadScale {
            scale: tag.scale.to_string(),
        });
    }
    Ok((v - tag.offset) / tag.scale)
}

/// Encodes a value into the registers of a tag in a register table (the inverse of
/// [`decode`]). A bool in a register bit is refused with [`EncodeError::RegisterBit`]: use
/// [`encode_bit_mask`]. Bit tables are refused with [`EncodeError::WrongTable`]: use
/// [`encode_bit`].
pub fn encode(tag: &TagSpec, value: &Value) -> Result<Vec<u16>, EncodeError> {
    if !tag.table.is_register() {
        return Err(EncodeError::WrongTable {
            table: tag.table.as_str(),
        });
    }
    let order = tag.byte_order;
    // The casts below are exact: `raw_integer` has checked the range of the type.
    Ok(match tag.data_type {
        DataType::Bool => {
            if tag.bit.is_some() {
                return Err(EncodeError::RegisterBit);
            }
            vec![u16::from(as_bool(value)?)]
        }
        DataType::Int16 => {
            let raw = raw_integer(tag, value, i16::MIN.into(), i16::MAX.into())? as i16;
            be_to_regs(raw.to_be_bytes(), order)
        }
        DataType::UInt16 => {
            let raw = raw_integer(tag, value, 0, u16::MAX.into())? as u16;
            be_to_regs(raw.to_be_bytes(), order)
        }
        DataType::Int32 => {
            let raw = raw_integer(tag, value, i32::MIN.into(), i32::MAX.into())? as i32;
            be_to_regs(raw.to_be_bytes(), order)
        }
        DataType::UInt32 => {
            let raw = raw_integer(tag, value, 0, u32::MAX.into())? as u32;
            be_to_regs(raw.to_be_bytes(), order)
        }
        DataType::Int64 => {
            let raw = raw_integer(tag, value, i64::MIN.into(), i64::MAX.into())? as i64;
            be_to_regs(raw.to_be_bytes(), order)
        }
        DataType::UInt64 => {
            let raw = raw_integer(tag, value, 0, u64::MAX.into())? as u64;
            be_to_regs(raw.to_be_bytes(), order)
        }
        DataType::Float32 => {
            let raw = raw_float(tag, value)?;
            let narrow = raw as f32;
            if raw.is_finite() && !narrow.is_finite() {
                return Err(EncodeError::OutOfRange {
                    value: raw.to_string(),
                    data_type: "float32",
                });
            }
            be_to_regs(narrow.to_be_bytes(), order)
        }
        DataType::Float64 => be_to_regs(raw_float(tag, value)?.to_be_bytes(), order),
        DataType::String { len } => {
            let Value::Str(s) = value else {
                return Err(EncodeError::WrongType {
                    expected: "string",
                    got: value_kind(value),
                });
            };
            let max = usize::from(len) * 2;
            if s.len() > max {
                return Err(EncodeError::StringTooLong { len: s.len(), max });
            }
            let mut bytes = s.as_bytes().to_vec();
            bytes.resize(max, 0);
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect()
        }
    })
}

/// Encodes a value for a coil (function 5/15): a bool, or a number that is exactly 0 or 1.
pub fn encode_bit(tag: &TagSpec, value: &Value) -> Result<bool, EncodeError> {
    if tag.table != Table::Coil || tag.data_type != DataType::Bool {
        return Err(EncodeError::WrongTable {
            table: tag.table.as_str(),
        });
    }
    as_bool(value)
}

/// Encodes a bool held in a register bit as the `(and_mask, or_mask)` of a masked register
/// write (function 0x16): `new = (current & and_mask) | (or_mask & !and_mask)`.
pub fn encode_bit_mask(tag: &TagSpec, value: &Value) -> Result<(u16, u16), EncodeError> {
    let (true, DataType::Bool, Some(bit)) = (tag.table.is_register(), tag.data_type, tag.bit)
    else {
        return Err(EncodeError::WrongTable {
            table: tag.table.as_str(),
        });
    };
    if bit > 15 {
        return Err(EncodeError::BitOutOfRange { bit });
    }
    let mask = 1u16 << bit;
    let or = if as_bool(value)? { mask } else { 0 };
    Ok((!mask, or))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use edgesync_protocol::PropertyId;
    use proptest::prelude::*;

    use super::*;
    use crate::model::{Access, ReportPolicy};

    fn tag(data_type: DataType, byte_order: ByteOrder) -> TagSpec {
        TagSpec {
            property: PropertyId::new("p").unwrap(),
            table: Table::HoldingRegister,
            address: 0,
            data_type,
            bit: None,
            byte_order,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            access: Access::ReadWrite,
            poll_interval: Duration::from_secs(1),
            report: ReportPolicy::default(),
        }
    }

    const ORDERS: [ByteOrder; 4] = [
        ByteOrder::Abcd,
        ByteOrder::Badc,
        ByteOrder::Cdab,
        ByteOrder::Dcba,
    ];

    /// Independent of `permute`: for each order, which big-endian byte goes to wire position i.
    /// Written out by hand from the names (A = be[0], B = be[1], ...).
    fn wire_index_4(order: ByteOrder) -> [usize; 4] {
        match order {
            ByteOrder::Abcd => [0, 1, 2, 3], // A B C D
            ByteOrder::Badc => [1, 0, 3, 2], // B A D C
            ByteOrder::Cdab => [2, 3, 0, 1], // C D A B
            ByteOrder::Dcba => [3, 2, 1, 0], // D C B A
        }
    }

    fn wire_index_8(order: ByteOrder) -> [usize; 8] {
        match order {
            ByteOrder::Abcd => [0, 1, 2, 3, 4, 5, 6, 7], // ABCDEFGH
            ByteOrder::Badc => [1, 0, 3, 2, 5, 4, 7, 6], // BADCFEHG
            ByteOrder::Cdab => [6, 7, 4, 5, 2, 3, 0, 1], // GHEFCDAB
            ByteOrder::Dcba => [7, 6, 5, 4, 3, 2, 1, 0], // HGFEDCBA
        }
    }

    fn wire_index_2(order: ByteOrder) -> [usize; 2] {
        match order {
            ByteOrder::Abcd | ByteOrder::Cdab => [0, 1],
            ByteOrder::Badc | ByteOrder::Dcba => [1, 0],
        }
    }

    /// Builds registers from big-endian bytes by an index table.
    fn wire(be: &[u8], idx: &[usize]) -> Vec<u16> {
        let bytes: Vec<u8> = idx.iter().map(|&i| be[i]).collect();
        bytes
            .chunks(2)
            .map(|c| u16::from(c[0]) << 8 | u16::from(c[1]))
            .collect()
    }

    fn regs_for(dt: DataType, order: ByteOrder, be: &[u8]) -> Vec<u16> {
        match dt.width() {
            1 => wire(be, &wire_index_2(order)),
            2 => wire(be, &wire_index_4(order)),
            _ => wire(be, &wire_index_8(order)),
        }
    }

    #[test]
    fn every_type_and_order_decodes_and_encodes() {
        let cases: Vec<(DataType, Vec<u8>, Value)> = vec![
            (
                DataType::Int16,
                (-12345i16).to_be_bytes().to_vec(),
                Value::Int(-12345),
            ),
            (
                DataType::UInt16,
                0xBEEFu16.to_be_bytes().to_vec(),
                Value::UInt(0xBEEF),
            ),
            (
                DataType::Int32,
                (-123_456_789i32).to_be_bytes().to_vec(),
                Value::Int(-123_456_789),
            ),
            (
                DataType::UInt32,
                0xDEAD_BEEFu32.to_be_bytes().to_vec(),
                Value::UInt(0xDEAD_BEEF),
            ),
            (
                DataType::Int64,
                (-1_234_567_890_123_456_789i64).to_be_bytes().to_vec(),
                Value::Int(-1_234_567_890_123_456_789),
            ),
            (
                DataType::UInt64,
                0xFEDC_BA98_7654_3210u64.to_be_bytes().to_vec(),
                Value::UInt(0xFEDC_BA98_7654_3210),
            ),
            (
                DataType::Float32,
                123.456f32.to_be_bytes().to_vec(),
                Value::Float(f64::from(123.456f32)),
            ),
            (
                DataType::Float64,
                (-98765.4321f64).to_be_bytes().to_vec(),
                Value::Float(-98765.4321),
            ),
        ];
        for (dt, be, expected) in cases {
            for order in ORDERS {
                let t = tag(dt, order);
                let regs = regs_for(dt, order, &be);
                assert_eq!(decode(&t, &regs), Ok(expected.clone()), "{dt:?} {order:?}");
                assert_eq!(encode(&t, &expected), Ok(regs), "{dt:?} {order:?}");
            }
        }
    }

    #[test]
    fn known_wire_examples() {
        // 0x12345678 in the four orders, spelled out.
        let t = |o| tag(DataType::UInt32, o);
        let v = Value::UInt(0x1234_5678);
        assert_eq!(
            decode(&t(ByteOrder::Abcd), &[0x1234, 0x5678]),
            Ok(v.clone())
        );
        assert_eq!(
            decode(&t(ByteOrder::Badc), &[0x3412, 0x7856]),
            Ok(v.clone())
        );
        assert_eq!(
            decode(&t(ByteOrder::Cdab), &[0x5678, 0x1234]),
            Ok(v.clone())
        );
        assert_eq!(decode(&t(ByteOrder::Dcba), &[0x7856, 0x3412]), Ok(v));
        // 1.0f32 = 0x3F800000, word swapped.
        assert_eq!(
            decode(&tag(DataType::Float32, ByteOrder::Cdab), &[0x0000, 0x3F80]),
            Ok(Value::Float(1.0))
        );
    }

    #[test]
    fn scale_and_offset() {
        let mut t = tag(DataType::Int16, ByteOrder::Abcd);
        t.scale = 0.1;
        t.offset = -40.0;
        let regs = [(-15i16) as u16];
        let Ok(Value::Float(v)) = decode(&t, &regs) else {
            panic!("not a float");
        };
        assert!((v - (-41.5)).abs() < 1e-9, "{v}");
        assert_eq!(encode(&t, &Value::Float(-41.5)), Ok(regs.to_vec()));
        // Rounds to the nearest raw value.
        assert_eq!(encode(&t, &Value::Float(-41.46)), Ok(regs.to_vec()));
        // Out of the int16 range after inverting the scale.
        assert!(matches!(
            encode(&t, &Value::Float(5000.0)),
            Err(EncodeError::OutOfRange { .. })
        ));
        // Unsigned, scaled: a float.
        let mut u = tag(DataType::UInt16, ByteOrder::Abcd);
        u.scale = 2.0;
        assert_eq!(decode(&u, &[21]), Ok(Value::Float(42.0)));
        // Integers written to a scaled tag go through the scale too.
        assert_eq!(encode(&u, &Value::Int(42)), Ok(vec![21]));
        // Float tag with scale.
        let mut f = tag(DataType::Float32, ByteOrder::Abcd);
        f.scale = 10.0;
        f.offset = 1.0;
        let regs = encode(&f, &Value::Float(26.0)).unwrap();
        assert_eq!(decode(&f, &regs), Ok(Value::Float(26.0)));
        // Zero scale cannot be inverted.
        u.scale = 0.0;
        assert!(matches!(
            encode(&u, &Value::Int(1)),
            Err(EncodeError::BadScale { .. })
        ));
    }

    #[test]
    fn integer_range_checks() {
        let t = tag(DataType::UInt16, ByteOrder::Abcd);
        assert!(matches!(
            encode(&t, &Value::Int(-1)),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(&t, &Value::Int(65536)),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert_eq!(encode(&t, &Value::Float(65534.6)), Ok(vec![65535]));
        assert!(matches!(
            encode(&t, &Value::Float(f64::NAN)),
            Err(EncodeError::NotFinite { .. })
        ));
        assert!(matches!(
            encode(&t, &Value::Str("1".into())),
            Err(EncodeError::WrongType { .. })
        ));
        let t = tag(DataType::UInt64, ByteOrder::Abcd);
        assert_eq!(
            encode(&t, &Value::UInt(u64::MAX)),
            Ok(vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF])
        );
        let t = tag(DataType::Int64, ByteOrder::Abcd);
        assert!(matches!(
            encode(&t, &Value::UInt(u64::MAX)),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            encode(&t, &Value::Float(1e30)),
            Err(EncodeError::OutOfRange { .. })
        ));
        let f = tag(DataType::Float32, ByteOrder::Abcd);
        assert!(matches!(
            encode(&f, &Value::Float(1e300)),
            Err(EncodeError::OutOfRange { .. })
        ));
    }

    #[test]
    fn nan_and_infinity_pass_through() {
        for order in ORDERS {
            let t = tag(DataType::Float32, order);
            let regs = regs_for(DataType::Float32, order, &f32::NAN.to_be_bytes());
            assert!(matches!(decode(&t, &regs), Ok(Value::Float(v)) if v.is_nan()));
            let t = tag(DataType::Float64, order);
            let regs = regs_for(DataType::Float64, order, &f64::INFINITY.to_be_bytes());
            assert_eq!(decode(&t, &regs), Ok(Value::Float(f64::INFINITY)));
        }
        let mut t = tag(DataType::Float32, ByteOrder::Abcd);
        t.scale = 2.0;
        let regs = encode(&t, &Value::Float(f64::NEG_INFINITY)).unwrap();
        assert_eq!(decode(&t, &regs), Ok(Value::Float(f64::NEG_INFINITY)));
    }

    #[test]
    fn strings() {
        let t = tag(DataType::String { len: 4 }, ByteOrder::Dcba);
        // "HELLO" + NUL padding, high byte first regardless of byte order.
        let regs = [0x4845, 0x4C4C, 0x4F00, 0x0000];
        assert_eq!(decode(&t, &regs), Ok(Value::Str("HELLO".into())));
        assert_eq!(encode(&t, &Value::Str("HELLO".into())), Ok(regs.to_vec()));
        // Trailing spaces are trimmed too, interior ones kept.
        let regs = [0x4120, 0x4220, 0x2020, 0x2000];
        assert_eq!(decode(&t, &regs), Ok(Value::Str("A B".into())));
        // Empty.
        assert_eq!(decode(&t, &[0; 4]), Ok(Value::Str(String::new())));
        // Not UTF-8.
        assert_eq!(
            decode(&t, &[0xFFFE, 0, 0, 0]),
            Err(DecodeError::InvalidString)
        );
        // Too long.
        assert!(matches!(
            encode(&t, &Value::Str("123456789".into())),
            Err(EncodeError::StringTooLong { len: 9, max: 8 })
        ));
        assert!(matches!(
            encode(&t, &Value::Int(1)),
            Err(EncodeError::WrongType { .. })
        ));
    }

    #[test]
    fn bits() {
        let mut t = tag(DataType::Bool, ByteOrder::Dcba);
        for bit in 0..16u8 {
            t.bit = Some(bit);
            let reg = 1u16 << bit;
            assert_eq!(decode(&t, &[reg]), Ok(Value::Bool(true)), "bit {bit}");
            assert_eq!(decode(&t, &[!reg]), Ok(Value::Bool(false)), "bit {bit}");
            // Function 0x16 semantics: (current & and) | (or & !and).
            let apply = |current: u16, (and, or): (u16, u16)| (current & and) | (or & !and);
            let set = encode_bit_mask(&t, &Value::Bool(true)).unwrap();
            let clear = encode_bit_mask(&t, &Value::Bool(false)).unwrap();
            for current in [0x0000u16, 0xFFFF, 0x5A5A] {
                assert_eq!(apply(current, set), current | reg);
                assert_eq!(apply(current, clear), current & !reg);
            }
        }
        assert_eq!(
            encode(&t, &Value::Bool(true)),
            Err(EncodeError::RegisterBit)
        );
        t.bit = Some(16);
        assert_eq!(
            decode(&t, &[0xFFFF]),
            Err(DecodeError::BitOutOfRange { bit: 16 })
        );
        assert!(encode_bit_mask(&t, &Value::Bool(true)).is_err());
        // A whole-register bool.
        t.bit = None;
        assert_eq!(decode(&t, &[0x0100]), Ok(Value::Bool(true)));
        assert_eq!(decode(&t, &[0]), Ok(Value::Bool(false)));
        assert_eq!(encode(&t, &Value::Int(1)), Ok(vec![1]));
        // Coils.
        let mut c = tag(DataType::Bool, ByteOrder::Abcd);
        c.table = Table::Coil;
        assert_eq!(decode_bit(&c, &[true]), Ok(Value::Bool(true)));
        assert_eq!(decode_bit(&c, &[false]), Ok(Value::Bool(false)));
        assert_eq!(
            decode_bit(&c, &[]),
            Err(DecodeError::Length {
                expected: 1,
                got: 0
            })
        );
        assert_eq!(encode_bit(&c, &Value::Bool(true)), Ok(true));
        assert_eq!(encode_bit(&c, &Value::Float(0.0)), Ok(false));
        assert!(encode_bit(&c, &Value::Int(2)).is_err());
        assert!(encode(&c, &Value::Bool(true)).is_err());
        c.data_type = DataType::Int16;
        assert!(decode_bit(&c, &[true]).is_err());
    }

    #[test]
    fn bad_lengths_are_errors() {
        let types = [
            DataType::Bool,
            DataType::Int16,
            DataType::UInt16,
            DataType::Int32,
            DataType::UInt32,
            DataType::Int64,
            DataType::UInt64,
            DataType::Float32,
            DataType::Float64,
            DataType::String { len: 3 },
        ];
        for dt in types {
            for n in [0usize, 1, 2, 3, 4, 5, 9] {
                let regs = vec![0u16; n];
                let r = decode(&tag(dt, ByteOrder::Abcd), &regs);
                if n == usize::from(dt.width()) {
                    assert!(r.is_ok(), "{dt:?} {n}");
                } else {
                    assert!(
                        matches!(r, Err(DecodeError::Length { got, .. }) if got == n),
                        "{dt:?} {n}"
                    );
                }
            }
        }
    }

    fn any_order() -> impl Strategy<Value = ByteOrder> {
        prop::sample::select(ORDERS.to_vec())
    }

    proptest! {
        #[test]
        fn int_round_trips(v in any::<i64>(), order in any_order()) {
            let t = tag(DataType::Int64, order);
            let regs = encode(&t, &Value::Int(v)).unwrap();
            prop_assert_eq!(decode(&t, &regs), Ok(Value::Int(v)));
            let t = tag(DataType::Int32, order);
            let v32 = v as i32;
            let regs = encode(&t, &Value::Int(v32.into())).unwrap();
            prop_assert_eq!(decode(&t, &regs), Ok(Value::Int(v32.into())));
            let t = tag(DataType::Int16, order);
            let v16 = v as i16;
            let regs = encode(&t, &Value::Int(v16.into())).unwrap();
            prop_assert_eq!(decode(&t, &regs), Ok(Value::Int(v16.into())));
        }

        #[test]
        fn uint_round_trips(v in any::<u64>(), order in any_order()) {
            for (dt, v) in [
                (DataType::UInt64, v),
                (DataType::UInt32, v & 0xFFFF_FFFF),
                (DataType::UInt16, v & 0xFFFF),
            ] {
                let t = tag(dt, order);
                let regs = encode(&t, &Value::UInt(v)).unwrap();
                prop_assert_eq!(decode(&t, &regs), Ok(Value::UInt(v)));
            }
        }

        #[test]
        fn float_bits_round_trip(b32 in any::<u32>(), b64 in any::<u64>(), order in any_order()) {
            let t = tag(DataType::Float32, order);
            let f = f32::from_bits(b32);
            let regs = encode(&t, &Value::Float(f.into())).unwrap();
            let Ok(Value::Float(back)) = decode(&t, &regs) else { panic!("not a float") };
            // NaN payloads may be canonicalised by the f32 -> f64 -> f32 trip; all else is exact.
            if f.is_nan() { prop_assert!(back.is_nan()) } else { prop_assert_eq!((back as f32).to_bits(), b32) }
            let t = tag(DataType::Float64, order);
            let f = f64::from_bits(b64);
            let regs = encode(&t, &Value::Float(f)).unwrap();
            let Ok(Value::Float(back)) = decode(&t, &regs) else { panic!("not a float") };
            prop_assert_eq!(back.to_bits(), b64);
        }

        #[test]
        fn registers_round_trip(regs in prop::collection::vec(any::<u16>(), 4), order in any_order()) {
            // decode then encode gives the registers back, for every exact type.
            for dt in [DataType::UInt16, DataType::Int16, DataType::UInt32, DataType::Int32,
                       DataType::UInt64, DataType::Int64, DataType::Float64] {
                let w = usize::from(dt.width());
                let t = tag(dt, order);
                let v = decode(&t, &regs[..w]).unwrap();
                prop_assert_eq!(encode(&t, &v).unwrap(), regs[..w].to_vec(), "{:?}", dt);
            }
        }

        #[test]
        fn scaled_round_trips(raw in any::<i16>(), scale in 0.001f64..1000.0, offset in -1e4f64..1e4) {
            let mut t = tag(DataType::Int16, ByteOrder::Cdab);
            t.scale = scale;
            t.offset = offset;
            let v = decode(&t, &[raw as u16]).unwrap();
            prop_assert_eq!(encode(&t, &v), Ok(vec![raw as u16]));
        }

        #[test]
        fn string_round_trips(s in "[ -~]{0,10}") {
            let t = tag(DataType::String { len: 5 }, ByteOrder::Abcd);
            let regs = encode(&t, &Value::Str(s.clone())).unwrap();
            prop_assert_eq!(decode(&t, &regs), Ok(Value::Str(s.trim_end_matches(' ').to_owned())));
        }

        #[test]
        fn decode_never_panics(regs in prop::collection::vec(any::<u16>(), 0..6), bit in 0u8..20) {
            for dt in [DataType::Bool, DataType::Float32, DataType::String { len: 2 }, DataType::UInt64] {
                let mut t = tag(dt, ByteOrder::Badc);
                t.bit = Some(bit);
                let _ = decode(&t, &regs);
            }
        }
    }
}
