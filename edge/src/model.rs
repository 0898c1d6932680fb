//! The validated device and tag model the agent runs.
//!
//! Config parsing (`config`) produces these types after validation; the Modbus links, the twin
//! store and the uplink consume them. Every value here has been checked: addresses fit their
//! table, a type's register count fits the 16-bit address space, ids are valid.

use std::time::Duration;

use edgesync_protocol::{DeviceId, PropertyId};

/// A Modbus data table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Coils (0x, read with function 1, written with 5/15).
    Coil,
    /// Discrete inputs (1x, read with function 2).
    DiscreteInput,
    /// Input registers (3x, read with function 4).
    InputRegister,
    /// Holding registers (4x, read with function 3, written with 6/16).
    HoldingRegister,
}

impl Table {
    /// Whether the table holds 16-bit registers (as opposed to single bits).
    pub fn is_register(&self) -> bool {
        matches!(self, Table::InputRegister | Table::HoldingRegister)
    }

    /// Stable lowercase name used in config and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Table::Coil => "coil",
            Table::DiscreteInput => "discrete_input",
            Table::InputRegister => "input_register",
            Table::HoldingRegister => "holding_register",
        }
    }
}

/// How a tag's registers become a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// A coil or discrete input, or bit `n` (0 = least significant) of a register.
    Bool,
    /// Signed 16-bit integer (1 register).
    Int16,
    /// Unsigned 16-bit integer (1 register).
    UInt16,
    /// Signed 32-bit integer (2 registers).
    Int32,
    /// Unsigned 32-bit integer (2 registers).
    UInt32,
    /// Signed 64-bit integer (4 registers).
    Int64,
    /// Unsigned 64-bit integer (4 registers).
    UInt64,
    /// IEEE 754 single precision (2 registers).
    Float32,
    /// IEEE 754 double precision (4 registers).
    Float64,
    /// Fixed-length string of `len` registers (2 ASCII bytes each, NUL padding trimmed).
    String {
        /// Length in registers.
        len: u16,
    },
}

impl DataType {
    /// How many 16-bit registers (or bits, for a bool in a bit table) the type occupies.
    pub fn width(&self) -> u16 {
        match self {
            DataType::Bool | DataType::Int16 | DataType::UInt16 => 1,
            DataType::Int32 | DataType::UInt32 | DataType::Float32 => 2,
            DataType::Int64 | DataType::UInt64 | DataType::Float64 => 4,
            DataType::String { len } => *len,
        }
    }
}

/// Byte and word order of a multi-register value, named by where the bytes of the big-endian
/// value `A B C D` (A most significant) end up on the wire, register by register.
///
/// For 64-bit values the same four names mean the same rule (`ABCD` = `ABCDEFGH` big endian,
/// `BADC` = bytes swapped within each register, `CDAB` = register order reversed, `DCBA` =
/// fully little endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ByteOrder {
    /// Big endian: registers most significant first, bytes high first (Modbus default).
    #[default]
    Abcd,
    /// Bytes swapped inside each register, registers most significant first.
    Badc,
    /// Registers least significant first, bytes high first ("word swap").
    Cdab,
    /// Little endian: registers least significant first, bytes swapped.
    Dcba,
}

/// Whether a tag may be read, written, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Access {
    /// Read only (the default).
    #[default]
    Read,
    /// Write only.
    Write,
    /// Read and write.
    ReadWrite,
}

/// When a tag's sample is reported (to the twin, MQTT and the outbox).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReportPolicy {
    /// Report only when the value moved by more than this absolute amount (0 = any change).
    pub deadband_abs: f64,
    /// Report only when the value moved by more than this percentage of the last report.
    pub deadband_pct: f64,
    /// Report an unchanged value at least this often (heartbeat); `None` = never.
    pub max_interval: Option<Duration>,
    /// Report every sample, changed or not.
    pub every_sample: bool,
    /// Only the latest value matters (a state, not a history): while the hub is unreachable,
    /// changes are not queued one by one; the latest value is sent when it is reachable again.
    pub state_only: bool,
}

/// One tag: a property of a device mapped onto Modbus registers or bits.
#[derive(Debug, Clone, PartialEq)]
pub struct TagSpec {
    /// The property this tag reports.
    pub property: PropertyId,
    /// The table it lives in.
    pub table: Table,
    /// 0-based offset within the table (protocol address).
    pub address: u16,
    /// Decoding.
    pub data_type: DataType,
    /// For a bool in a register table: the bit (0..=15).
    pub bit: Option<u8>,
    /// Byte/word order (the device default unless the tag overrides it).
    pub byte_order: ByteOrder,
    /// `value = raw * scale + offset`.
    pub scale: f64,
    /// `value = raw * scale + offset`.
    pub offset: f64,
    /// Engineering unit, for display.
    pub unit: Option<String>,
    /// Read, write or both.
    pub access: Access,
    /// How often to poll this tag.
    pub poll_interval: Duration,
    /// When to report.
    pub report: ReportPolicy,
}

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity (the Modbus RTU default).
    #[default]
    Even,
    /// Odd parity.
    Odd,
}

impl Parity {
    /// Stable lowercase name used in config and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Parity::None => "none",
            Parity::Even => "even",
            Parity::Odd => "odd",
        }
    }
}

/// Shortest inter-frame delay used on a serial line, whatever the baud rate.
pub const MIN_INTER_FRAME_DELAY: Duration = Duration::from_millis(2);

/// The default silence between two RTU frames: 3.5 character times at `baud`, where one
/// character is 1 start bit + `data_bits` + 1 parity bit unless `parity` is none +
/// `stop_bits`, but at least [`MIN_INTER_FRAME_DELAY`].
///
/// Worked example: 19200 baud, 8 data bits, even parity, 1 stop bit = 11 bits per character,
/// 3.5 × 11 / 19200 s = 2.005 ms. At 9600 baud 8N1 (10 bits): 3.646 ms. At 115200 baud the
/// computed 0.33 ms is raised to 2 ms. A zero baud rate gives the minimum.
pub fn default_inter_frame_delay(
    baud: u32,
    parity: Parity,
    data_bits: u8,
    stop_bits: u8,
) -> Duration {
    if baud == 0 {
        return MIN_INTER_FRAME_DELAY;
    }
    let parity_bits = u64::from(parity != Parity::None);
    let bits = 1 + u64::from(data_bits) + parity_bits + u64::from(stop_bits);
    // 3.5 characters = 7 half characters, in nanoseconds, rounded up.
    let nanos = (7 * bits * 1_000_000_000).div_ceil(2 * u64::from(baud));
    Duration::from_nanos(nanos).max(MIN_INTER_FRAME_DELAY)
}

/// How the agent reaches a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LinkSpec {
    /// Modbus TCP to `host:port`.
    Tcp {
        /// `host:port`.
        endpoint: String,
    },
    /// Modbus RTU over a local serial port (RS-485 or RS-232).
    Rtu {
        /// Path of the serial device, e.g. `/dev/ttyUSB0`.
        path: String,
        /// Baud rate.
        baud: u32,
        /// Parity.
        parity: Parity,
        /// Data bits per character (7 or 8).
        data_bits: u8,
        /// Stop bits per character (1 or 2).
        stop_bits: u8,
        /// Silence kept between the end of one frame and the start of the next.
        inter_frame_delay: Duration,
    },
    /// Modbus RTU frames carried over TCP to `host:port` (a serial-to-Ethernet converter in
    /// transparent mode).
    RtuOverTcp {
        /// `host:port`.
        endpoint: String,
    },
}

impl LinkSpec {
    /// A stable key naming the physical link (devices sharing it share one connection).
    ///
    /// It names only the physical resource: a serial port is its path, whatever the line
    /// settings (the config refuses two devices that give one port different settings).
    pub fn key(&self) -> String {
        match self {
            LinkSpec::Tcp { endpoint } => format!("tcp://{endpoint}"),
            LinkSpec::Rtu { path, .. } => format!("rtu://{path}"),
            LinkSpec::RtuOverTcp { endpoint } => format!("rtu+tcp://{endpoint}"),
        }
    }

    /// Whether requests are framed as Modbus RTU (no transaction ids: one shared bus).
    pub fn is_rtu(&self) -> bool {
        matches!(self, LinkSpec::Rtu { .. } | LinkSpec::RtuOverTcp { .. })
    }
}

/// One device: a Modbus unit on a link, with its tags.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    /// The device id (unique on the node).
    pub id: DeviceId,
    /// How to reach it.
    pub link: LinkSpec,
    /// Modbus unit id (slave id).
    pub unit_id: u8,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Most registers read with one request (<= 125).
    pub max_registers_per_read: u16,
    /// Most bits read with one request (<= 2000).
    pub max_bits_per_read: u16,
    /// Largest gap of unused registers (or bits) bridged to merge two reads.
    pub max_gap: u16,
    /// The tags.
    pub tags: Vec<TagSpec>,
}

/// Builders of tags and devices for unit tests across the crate.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_support {
    use std::time::Duration;

    use edgesync_protocol::{DeviceId, PropertyId};

    use super::*;

    /// A tag at address 0 (change fields as needed): byte order ABCD, scale 1, offset 0,
    /// polled every 100 ms, default report policy.
    pub(crate) fn tag(name: &str, table: Table, data_type: DataType, access: Access) -> TagSpec {
        TagSpec {
            property: PropertyId::new(name).unwrap(),
            table,
            address: 0,
            data_type,
            bit: None,
            byte_order: ByteOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            access,
            poll_interval: Duration::from_millis(100),
            report: ReportPolicy::default(),
        }
    }

    /// A TCP device (unit 1, 1 s timeout, Modbus's read limits, no gap bridging).
    pub(crate) fn device(id: &str, tags: Vec<TagSpec>) -> DeviceSpec {
        DeviceSpec {
            id: DeviceId::new(id).unwrap(),
            link: LinkSpec::Tcp {
                endpoint: "x:1".into(),
            },
            unit_id: 1,
            timeout: Duration::from_secs(1),
            max_registers_per_read: 125,
            max_bits_per_read: 2000,
            max_gap: 0,
            tags,
        }
    }
}
