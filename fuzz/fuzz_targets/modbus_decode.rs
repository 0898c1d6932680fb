//! Registers and bits as a PLC might send them, decoded for an arbitrary tag.
//!
//! Input: tag parameters (table, type, string length, bit, byte order, scale, offset) and the
//! register words and bits of a response. Checks:
//! - `decode` / `decode_bit` never panic, whatever the tag and however many words arrive;
//! - when decoding succeeds, `encode` (or `encode_bit` / `encode_bit_mask`) never panics;
//! - with identity scaling (`scale == 1`, `offset == 0`), re-encoding a decoded value and
//!   decoding it again gives the same value (bit for bit for floats, so NaN payloads count).

#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use edgesync_edge::model::{Access, ByteOrder, DataType, ReportPolicy, Table, TagSpec};
use edgesync_edge::modbus::codec::{decode, decode_bit, encode, encode_bit, encode_bit_mask};
use edgesync_protocol::{PropertyId, Value};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    table: u8,
    data_type: u8,
    string_len: u8,
    bit: Option<u8>,
    byte_order: u8,
    /// Use scale 1 / offset 0 (the exact path) instead of the arbitrary ones below.
    identity: bool,
    scale: f64,
    offset: f64,
    /// Cut or pad the words to the type's width, so that most inputs get past the length check.
    fit_width: bool,
    regs: Vec<u16>,
    bits: Vec<bool>,
}

fn tag(input: &Input) -> Option<TagSpec> {
    let table = match input.table % 4 {
        0 => Table::Coil,
        1 => Table::DiscreteInput,
        2 => Table::InputRegister,
        _ => Table::HoldingRegister,
    };
    let data_type = match input.data_type % 10 {
        0 => DataType::Bool,
        1 => DataType::Int16,
        2 => DataType::UInt16,
        3 => DataType::Int32,
        4 => DataType::UInt32,
        5 => DataType::Int64,
        6 => DataType::UInt64,
        7 => DataType::Float32,
        8 => DataType::Float64,
        _ => DataType::String {
            len: u16::from(input.string_len),
        },
    };
    let byte_order = match input.byte_order % 4 {
        0 => ByteOrder::Abcd,
        1 => ByteOrder::Badc,
        2 => ByteOrder::Cdab,
        _ => ByteOrder::Dcba,
    };
    let (scale, offset) = if input.identity {
        (1.0, 0.0)
    } else {
        (input.scale, input.offset)
    };
    Some(TagSpec {
        property: PropertyId::new("fuzz").ok()?,
        table,
        address: 0,
        data_type,
        bit: input.bit,
        byte_order,
        scale,
        offset,
        unit: None,
        access: Access::ReadWrite,
        poll_interval: Duration::from_millis(100),
        report: ReportPolicy::default(),
    })
}

/// Equality that treats floats by their bits (NaN == NaN with the same payload).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

fuzz_target!(|input: Input| {
    let Some(tag) = tag(&input) else {
        return;
    };
    let exact = input.identity;
    if tag.table.is_register() {
        let mut regs = input.regs.clone();
        if input.fit_width {
            regs.resize(usize::from(tag.data_type.width()), 0);
        }
        let Ok(value) = decode(&tag, &regs) else {
            return;
        };
        match encode(&tag, &value) {
            Ok(words) => {
                assert_eq!(
                    words.len(),
                    usize::from(tag.data_type.width()),
                    "encode gave the wrong number of registers for {tag:?}"
                );
                let again = decode(&tag, &words);
                if exact {
                    match again {
                        Ok(again) => assert!(
                            same(&value, &again),
                            "round trip changed {value:?} into {again:?} for {tag:?} (regs {regs:?}, encoded {words:?})"
                        ),
                        Err(e) => panic!(
                            "re-decoding encoded {words:?} of {value:?} failed: {e} for {tag:?}"
                        ),
                    }
                }
            }
            Err(_) => {
                // Refusals are allowed (register bits, out-of-range after scaling), but
                // with identity scaling a decoded value must be encodable unless it is a
                // register bit (written with a masked write instead).
                if exact && tag.bit.is_none() {
                    panic!("decoded {value:?} from {regs:?} cannot be encoded back for {tag:?}");
                }
            }
        }
        if tag.data_type == DataType::Bool {
            let _ = encode_bit_mask(&tag, &value);
        }
    } else {
        let mut bits = input.bits.clone();
        if input.fit_width {
            bits.resize(1, false);
        }
        let Ok(value) = decode_bit(&tag, &bits) else {
            return;
        };
        match encode_bit(&tag, &value) {
            Ok(bit) => {
                if tag.table == Table::Coil {
                    assert_eq!(Some(&bit), bits.first(), "coil round trip for {tag:?}");
                }
            }
            Err(e) => {
                if tag.table == Table::Coil {
                    panic!("decoded coil {value:?} cannot be encoded back: {e}");
                }
            }
        }
        let _ = encode(&tag, &value);
    }
});
