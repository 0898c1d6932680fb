//! Every worked example of docs/modbus.md, checked against the codec (decode and encode) and
//! the address parser.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use edgesync_edge::config::parse_shorthand;
use edgesync_edge::modbus::codec::{decode, encode};
use edgesync_edge::model::{Access, ByteOrder, DataType, ReportPolicy, Table, TagSpec};
use edgesync_protocol::{PropertyId, Value};

fn tag(data_type: DataType, order: ByteOrder) -> TagSpec {
    TagSpec {
        property: PropertyId::new("doc").unwrap(),
        table: Table::HoldingRegister,
        address: 0,
        data_type,
        bit: None,
        byte_order: order,
        scale: 1.0,
        offset: 0.0,
        unit: None,
        access: Access::ReadWrite,
        poll_interval: Duration::from_secs(1),
        report: ReportPolicy::default(),
    }
}

/// `regs` decode to `value` and `value` encodes to `regs`.
fn both_ways(t: &TagSpec, regs: &[u16], value: Value) {
    assert_eq!(decode(t, regs).unwrap(), value, "decode {regs:04X?}");
    assert_eq!(encode(t, &value).unwrap(), regs, "encode {value:?}");
}

#[test]
fn float32_123456_in_the_four_orders() {
    assert_eq!(123_456.0f32.to_bits(), 0x47F1_2000);
    for (order, regs) in [
        (ByteOrder::Abcd, [0x47F1, 0x2000]),
        (ByteOrder::Badc, [0xF147, 0x0020]),
        (ByteOrder::Cdab, [0x2000, 0x47F1]),
        (ByteOrder::Dcba, [0x0020, 0xF147]),
    ] {
        both_ways(
            &tag(DataType::Float32, order),
            &regs,
            Value::Float(123_456.0),
        );
    }
}

#[test]
fn float64_123456_in_the_four_orders() {
    assert_eq!(123_456.0f64.to_bits(), 0x40FE_2400_0000_0000);
    for (order, regs) in [
        (ByteOrder::Abcd, [0x40FE, 0x2400, 0x0000, 0x0000]),
        (ByteOrder::Badc, [0xFE40, 0x0024, 0x0000, 0x0000]),
        (ByteOrder::Cdab, [0x0000, 0x0000, 0x2400, 0x40FE]),
        (ByteOrder::Dcba, [0x0000, 0x0000, 0x0024, 0xFE40]),
    ] {
        both_ways(
            &tag(DataType::Float64, order),
            &regs,
            Value::Float(123_456.0),
        );
    }
}

#[test]
fn int32_and_uint64_examples() {
    for (order, regs) in [
        (ByteOrder::Abcd, [0x1234, 0x5678]),
        (ByteOrder::Badc, [0x3412, 0x7856]),
        (ByteOrder::Cdab, [0x5678, 0x1234]),
        (ByteOrder::Dcba, [0x7856, 0x3412]),
    ] {
        both_ways(&tag(DataType::Int32, order), &regs, Value::Int(0x1234_5678));
    }
    both_ways(
        &tag(DataType::Int32, ByteOrder::Abcd),
        &[0xFFFF, 0xFFFE],
        Value::Int(-2),
    );
    both_ways(
        &tag(DataType::UInt64, ByteOrder::Cdab),
        &[0x7788, 0x5566, 0x3344, 0x1122],
        Value::UInt(0x1122_3344_5566_7788),
    );
}

#[test]
fn sixteen_bit_examples() {
    both_ways(
        &tag(DataType::Int16, ByteOrder::Abcd),
        &[0xFFFE],
        Value::Int(-2),
    );
    both_ways(
        &tag(DataType::Int16, ByteOrder::Badc),
        &[0xFEFF],
        Value::Int(-2),
    );
    both_ways(
        &tag(DataType::UInt16, ByteOrder::Abcd),
        &[0xFFFE],
        Value::UInt(65534),
    );
    // CDAB has no effect on one register.
    both_ways(
        &tag(DataType::Int16, ByteOrder::Cdab),
        &[0xFFFE],
        Value::Int(-2),
    );
}

#[test]
fn scale_and_offset_example() {
    let mut t = tag(DataType::Int16, ByteOrder::Abcd);
    t.scale = 0.1;
    t.offset = -40.0;
    let v = decode(&t, &[2150]).unwrap().as_f64().unwrap();
    assert!((v - 175.0).abs() < 1e-9, "{v}");
    assert_eq!(encode(&t, &Value::Float(175.0)).unwrap(), [2150]);
}

#[test]
fn string_and_bit_examples() {
    both_ways(
        &tag(DataType::String { len: 2 }, ByteOrder::Abcd),
        &[0x4869, 0x2100],
        Value::Str("Hi!".into()),
    );
    let mut t = tag(DataType::Bool, ByteOrder::Abcd);
    t.bit = Some(3);
    assert_eq!(decode(&t, &[0x0008]).unwrap(), Value::Bool(true));
    assert_eq!(decode(&t, &[0xFFF7]).unwrap(), Value::Bool(false));
}

#[test]
fn address_examples() {
    assert_eq!(
        parse_shorthand("40001").unwrap(),
        (Table::HoldingRegister, 0)
    );
    assert_eq!(
        parse_shorthand("40100").unwrap(),
        (Table::HoldingRegister, 99)
    );
    assert_eq!(parse_shorthand("30010").unwrap(), (Table::InputRegister, 9));
    assert_eq!(parse_shorthand("10005").unwrap(), (Table::DiscreteInput, 4));
    assert_eq!(parse_shorthand("00003").unwrap(), (Table::Coil, 2));
    assert_eq!(
        parse_shorthand("465536").unwrap(),
        (Table::HoldingRegister, 65535)
    );
}
