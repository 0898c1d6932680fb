//! `edgesync-agent probe`: read a register range from a live device once and print it in every
//! interpretation, so an engineer can see which type and byte order a tag needs.
//!
//! [`read_registers`] does the one request (Modbus TCP, with a timeout on connecting and on the
//! request); [`render`] turns registers into the printed report. Every interpretation comes
//! from [`codec::decode`] with a synthetic [`TagSpec`], so what the probe shows is exactly what
//! a tag of that type and byte order would report.
//!
//! The report has two tables: the raw registers (offset, shorthand address, hex, unsigned and
//! signed decimal, the two ASCII bytes), then one row per starting register and byte order with
//! the 16-bit (ABCD and BADC rows only; CDAB and DCBA rows show `=`, as they repeat them),
//! 32-bit and 64-bit (`-` where too few registers remain) values; and last the whole range as
//! a string.

use std::time::Duration;

use edgesync_protocol::{PropertyId, Value};
use tokio_modbus::client::Reader as _;
use tokio_modbus::slave::Slave;

use crate::config::{parse_shorthand, shorthand};
use crate::modbus::codec;
use crate::model::{Access, ByteOrder, DataType, ReportPolicy, Table, TagSpec};

/// Most registers one probe reads (the Modbus limit of one read).
pub const MAX_COUNT: u16 = 125;

/// What to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRequest {
    /// `host:port` of the Modbus TCP server.
    pub endpoint: String,
    /// Modbus unit id.
    pub unit: u8,
    /// `InputRegister` or `HoldingRegister`.
    pub table: Table,
    /// 0-based offset of the first register.
    pub address: u16,
    /// Number of registers, 1..=[`MAX_COUNT`].
    pub count: u16,
    /// Timeout of connecting, and then of the request.
    pub timeout: Duration,
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The table holds bits, not registers.
    #[error("the {0} table holds bits; probe reads input_register or holding_register")]
    NotRegisters(&'static str),
    /// The count is 0 or above [`MAX_COUNT`].
    #[error("count {0} is out of range (1..=125)")]
    Count(u16),
    /// The range runs past the end of the table.
    #[error("registers {address}..{address}+{count} run past the end of the table (65535)")]
    Range {
        /// First offset.
        address: u16,
        /// Count.
        count: u16,
    },
    /// The address could not be understood.
    #[error("{0}")]
    Address(String),
    /// The TCP connection could not be made.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("no answer from {endpoint} unit {unit} within {timeout:?}")]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// The unit.
        unit: u8,
        /// The timeout.
        timeout: Duration,
    },
    /// The device answered with a Modbus exception.
    #[error("the device answered with exception {code:#04x} ({name})")]
    Exception {
        /// The exception code.
        code: u8,
        /// Its name.
        name: String,
    },
    /// The connection broke or the answer was malformed.
    #[error("modbus transport error: {0}")]
    Transport(String),
    /// The device answered with another number of registers than asked.
    #[error("asked for {expected} registers, the device answered {got}")]
    Length {
        /// Asked.
        expected: usize,
        /// Answered.
        got: usize,
    },
}

/// Resolves `--table` / `--address`: with a table, the address is a 0-based offset (an
/// integer); without one, it must be the 1-based shorthand of a register table (`40001`,
/// `30001`, or the 6-digit forms).
pub fn resolve_address(table: Option<Table>, address: &str) -> Result<(Table, u16), ProbeError> {
    match table {
        Some(t) => {
            let a: u16 = address.trim().parse().map_err(|_| {
                ProbeError::Address(format!(
                    "address {address:?} is not a 0-based offset (0..=65535); leave out --table to give a shorthand such as 40001"
                ))
            })?;
            Ok((t, a))
        }
        None => {
            if address.len() < 5 {
                return Err(ProbeError::Address(format!(
                    "address {address:?} without --table must be a shorthand register address such as 40001 (holding) or 30001 (input)"
                )));
            }
            parse_shorthand(address).map_err(|e| ProbeError::Address(e.to_string()))
        }
    }
}

/// Checks a request before anything is sent.
pub fn check(req: &ProbeRequest) -> Result<(), ProbeError> {
    if !req.table.is_register() {
        return Err(ProbeError::NotRegisters(req.table.as_str()));
    }
    if req.count == 0 || req.count > MAX_COUNT {
        return Err(ProbeError::Count(req.count));
    }
    if u32::from(req.address) + u32::from(req.count) > 65_536 {
        return Err(ProbeError::Range {
            address: req.address,
            count: req.count,
        });
    }
    Ok(())
}

/// Reads the range once: connects (within the timeout), sends one read (function 3 or 4) and
/// waits for its answer (within the timeout).
pub async fn read_registers(req: &ProbeRequest) -> Result<Vec<u16>, ProbeError> {
    check(req)?;
    let timeout_err = || ProbeError::Timeout {
        endpoint: req.endpoint.clone(),
        unit: req.unit,
        timeout: req.timeout,
    };
    let stream = tokio::time::timeout(
        req.timeout,
        tokio::net::TcpStream::connect(req.endpoint.as_str()),
    )
    .await
    .map_err(|_| timeout_err())?
    .map_err(|source| ProbeError::Connect {
        endpoint: req.endpoint.clone(),
        source,
    })?;
    let mut ctx = tokio_modbus::client::tcp::attach_slave(stream, Slave(req.unit));
    let call = async {
        match req.table {
            Table::HoldingRegister => ctx.read_holding_registers(req.address, req.count).await,
            _ => ctx.read_input_registers(req.address, req.count).await,
        }
    };
    let answer = tokio::time::timeout(req.timeout, call)
        .await
        .map_err(|_| timeout_err())?
        .map_err(|e| ProbeError::Transport(e.to_string()))?;
    let regs = answer.map_err(|code| ProbeError::Exception {
        code: u8::from(code),
        name: code.to_string(),
    })?;
    if regs.len() != usize::from(req.count) {
        return Err(ProbeError::Length {
            expected: usize::from(req.count),
            got: regs.len(),
        });
    }
    Ok(regs)
}

const ORDERS: [(ByteOrder, &str); 4] = [
    (ByteOrder::Abcd, "ABCD"),
    (ByteOrder::Badc, "BADC"),
    (ByteOrder::Cdab, "CDAB"),
    (ByteOrder::Dcba, "DCBA"),
];

/// A tag of `data_type` and `order` at identity scale, for the codec.
fn synthetic(table: Table, data_type: DataType, order: ByteOrder) -> Option<TagSpec> {
    Some(TagSpec {
        property: PropertyId::new("probe").ok()?,
        table,
        address: 0,
        data_type,
        bit: None,
        byte_order: order,
        scale: 1.0,
        offset: 0.0,
        unit: None,
        access: Access::Read,
        poll_interval: Duration::from_secs(1),
        report: ReportPolicy::default(),
    })
}

/// A float as an engineer reads it: plain for ordinary magnitudes, scientific otherwise.
fn fmt_float(v: f64, single: bool) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let a = v.abs();
    let plain = a == 0.0 || (1e-4..1e9).contains(&a);
    match (single, plain) {
        (true, true) => format!("{}", v as f32),
        (true, false) => format!("{:e}", v as f32),
        (false, true) => format!("{v}"),
        (false, false) => format!("{v:e}"),
    }
}

/// One interpretation as text ("" when it does not apply, "-" for too few registers).
fn interpret(table: Table, regs: &[u16], data_type: DataType, order: ByteOrder) -> String {
    let width = usize::from(data_type.width());
    let Some(slice) = regs.get(..width) else {
        return "-".to_owned();
    };
    let Some(tag) = synthetic(table, data_type, order) else {
        return "?".to_owned();
    };
    match codec::decode(&tag, slice) {
        Ok(Value::Int(i)) => i.to_string(),
        Ok(Value::UInt(u)) => u.to_string(),
        Ok(Value::Float(f)) => fmt_float(f, data_type == DataType::Float32),
        Ok(Value::Bool(b)) => b.to_string(),
        Ok(Value::Str(s)) => format!("{s:?}"),
        Err(e) => format!("({e})"),
    }
}

/// The two bytes of a register as printable ASCII (`.` for anything else).
fn ascii(reg: u16) -> String {
    reg.to_be_bytes()
        .iter()
        .map(|b| {
            if b.is_ascii_graphic() || *b == b' ' {
                char::from(*b)
            } else {
                '.'
            }
        })
        .collect()
}

/// Right-aligns every column of `rows` (the first row is the header) and joins them.
fn table_text(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:>w$}", w = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The printed report for `regs`, read from `table` starting at 0-based `address`.
pub fn render(table: Table, address: u16, regs: &[u16]) -> String {
    let mut out = String::new();
    let last = u32::from(address) + regs.len().saturating_sub(1) as u32;
    out.push_str(&format!(
        "{} registers {}..={} ({}..={}), {} registers\n\n",
        table.as_str(),
        address,
        last,
        shorthand(table, u32::from(address)),
        shorthand(table, last),
        regs.len()
    ));

    let mut raw = vec![vec![
        "offset".to_owned(),
        "address".to_owned(),
        "hex".to_owned(),
        "uint16".to_owned(),
        "int16".to_owned(),
        "ascii".to_owned(),
    ]];
    for (i, reg) in regs.iter().enumerate() {
        let off = u32::from(address) + i as u32;
        raw.push(vec![
            off.to_string(),
            shorthand(table, off),
            format!("0x{reg:04X}"),
            reg.to_string(),
            (*reg as i16).to_string(),
            format!("\"{}\"", ascii(*reg)),
        ]);
    }
    out.push_str(&table_text(&raw));
    out.push('\n');

    let mut rows = vec![
        [
            "offset", "order", "int16", "uint16", "int32", "uint32", "float32", "int64", "uint64",
            "float64",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<String>>(),
    ];
    for i in 0..regs.len() {
        let rest = &regs[i..];
        let off = u32::from(address) + i as u32;
        for (order, name) in ORDERS {
            let sixteen = matches!(order, ByteOrder::Abcd | ByteOrder::Badc);
            let mut row = vec![off.to_string(), name.to_owned()];
            for t in [DataType::Int16, DataType::UInt16] {
                // 16-bit values have no word order: CDAB repeats ABCD, DCBA repeats BADC.
                row.push(if sixteen {
                    interpret(table, rest, t, order)
                } else {
                    "=".to_owned()
                });
            }
            for t in [
                DataType::Int32,
                DataType::UInt32,
                DataType::Float32,
                DataType::Int64,
                DataType::UInt64,
                DataType::Float64,
            ] {
                row.push(interpret(table, rest, t, order));
            }
            rows.push(row);
        }
    }
    out.push_str(&table_text(&rows));
    out.push('\n');

    let len = u16::try_from(regs.len()).unwrap_or(u16::MAX);
    let string = if len == 0 {
        "\"\"".to_owned()
    } else {
        interpret(table, regs, DataType::String { len }, ByteOrder::Abcd)
    };
    out.push_str(&format!("string ({} registers): {string}\n", regs.len()));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The row of `text` for `offset` and `order`, split into cells.
    fn row<'a>(text: &'a str, offset: &str, order: &str) -> Vec<&'a str> {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|c| c.len() > 2 && c[0] == offset && c[1] == order)
            .unwrap_or_else(|| panic!("no row {offset} {order} in\n{text}"))
    }

    #[test]
    fn float32_abcd_of_known_registers() {
        let text = render(Table::HoldingRegister, 0, &[0x4148, 0x0000]);
        let r = row(&text, "0", "ABCD");
        // offset order int16 uint16 int32 uint32 float32 int64 uint64 float64
        assert_eq!(
            r,
            [
                "0",
                "ABCD",
                "16712",
                "16712",
                "1095237632",
                "1095237632",
                "12.5",
                "-",
                "-",
                "-"
            ]
        );
        // CDAB of [0x4148, 0x0000] is 0x00004148: a denormal float, shown in scientific form.
        let r = row(&text, "0", "CDAB");
        assert_eq!(r[2..7], ["=", "=", "16712", "16712", "2.3418e-41"]);
        assert!(text.contains("40001..=40002"), "{text}");
        assert!(text.contains("0x4148"), "{text}");
        assert!(text.contains("\"AH\""), "{text}");
    }

    #[test]
    fn every_order_of_a_float32_and_a_float64() {
        // 123456.0f32 = 0x47F12000 in the four orders, one after the other.
        let regs = [0x47F1, 0x2000];
        for (order, regs) in [
            ("ABCD", [0x47F1, 0x2000]),
            ("BADC", [0xF147, 0x0020]),
            ("CDAB", [0x2000, 0x47F1]),
            ("DCBA", [0x0020, 0xF147]),
        ] {
            let text = render(Table::InputRegister, 10, &regs);
            let r = row(&text, "10", order);
            assert!(r.contains(&"123456"), "{order}: {r:?}");
        }
        let _ = regs;
        // 1.5f64 = 0x3FF8_0000_0000_0000.
        let text = render(Table::HoldingRegister, 0, &[0x3FF8, 0, 0, 0]);
        let r = row(&text, "0", "ABCD");
        assert_eq!(r.last(), Some(&"1.5"));
        let text = render(Table::HoldingRegister, 0, &[0, 0, 0, 0xF83F]);
        assert_eq!(row(&text, "0", "DCBA").last(), Some(&"1.5"));
        // Row for offset 1 has no 64-bit values.
        assert_eq!(row(&text, "1", "ABCD").last(), Some(&"-"));
    }

    #[test]
    fn sixteen_bit_values_and_strings() {
        let text = render(Table::HoldingRegister, 0, &[0xFFFE, 0x4869, 0x2100]);
        let r = row(&text, "0", "ABCD");
        assert_eq!(r[2..4], ["-2", "65534"]);
        let r = row(&text, "0", "BADC");
        assert_eq!(r[2..4], ["-257", "65279"]);
        assert!(text.contains("string (3 registers)"), "{text}");
        let text = render(Table::HoldingRegister, 0, &[0x4869, 0x2100]);
        assert!(text.contains("string (2 registers): \"Hi!\""), "{text}");
    }

    #[test]
    fn addresses_and_checks() {
        assert_eq!(
            resolve_address(None, "40001").unwrap(),
            (Table::HoldingRegister, 0)
        );
        assert_eq!(
            resolve_address(None, "30010").unwrap(),
            (Table::InputRegister, 9)
        );
        // With a table the number is a 0-based offset, even if it looks like a shorthand.
        assert_eq!(
            resolve_address(Some(Table::HoldingRegister), "40001").unwrap(),
            (Table::HoldingRegister, 40001)
        );
        assert!(resolve_address(None, "12").is_err());
        assert!(resolve_address(Some(Table::HoldingRegister), "x").is_err());
        let req = ProbeRequest {
            endpoint: "127.0.0.1:1".into(),
            unit: 1,
            table: Table::HoldingRegister,
            address: 65_530,
            count: 8,
            timeout: Duration::from_millis(100),
        };
        assert!(matches!(check(&req), Err(ProbeError::Range { .. })));
        let req = ProbeRequest {
            count: 126,
            address: 0,
            ..req
        };
        assert!(matches!(check(&req), Err(ProbeError::Count(126))));
        let req = ProbeRequest {
            count: 1,
            table: Table::Coil,
            ..req
        };
        assert!(matches!(check(&req), Err(ProbeError::NotRegisters(_))));
    }
}
