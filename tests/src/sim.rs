//! A Modbus TCP PLC simulator for tests.
//!
//! [`SimHandle::start`] binds a Modbus TCP server (tokio-modbus's server skeleton) that
//! simulates one or more unit ids. Each unit owns four fixed-size banks (coils, discrete
//! inputs, input registers, holding registers) that a test can read and write directly,
//! that Modbus clients read and write through function codes 1, 2, 3, 4, 5, 6, 15 and 16,
//! and that background [`Script`]s drive over time.
//!
//! Faults are injected per unit at runtime with [`SimHandle::set_fault`]: no answer, late
//! answers, or exception responses for every request or only for an address range.
//! Request counters per unit and per function code let a test count the requests of a
//! poll cycle; [`SimHandle::record_arrivals`] additionally keeps the arrival instant of every
//! request per unit ([`Arrival`]), so a benchmark can measure a poller's cycle jitter from the
//! PLC's side.
//!
//! Invariants:
//! - The set of units and the size of every bank are fixed when the server starts.
//! - Every unit has one mutex guarding its banks and its fault; it is held only to copy
//!   words in or out, never across an await.
//! - A request for a unit id that is not simulated is never answered (like a gateway whose
//!   slave is dead), unless [`SimConfig::unknown_unit`] says to answer with an exception.
//! - Dropping the last [`SimHandle`] (or calling [`SimHandle::shutdown`]) stops the listener,
//!   every open connection and every script.
//! - Every connection's stream is wrapped so that it reads as closed once
//!   [`SimHandle::drop_connections`] is called or a [`Fault::Disconnect`] unit was addressed
//!   on it; the server's request loop then ends and the socket is closed.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    ops::Range,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::watch,
    task::AbortHandle,
    time::{Instant, MissedTickBehavior, Sleep},
};
use tokio_modbus::{
    ExceptionCode, Request, Response, SlaveRequest,
    server::{Service, tcp::Server},
};

/// Default number of items in each bank of a unit.
pub const DEFAULT_BANK_SIZE: usize = 10_000;

/// Largest bank a unit can have: the whole 16-bit Modbus address space.
pub const MAX_BANK_SIZE: usize = 65_536;

/// Most registers a single read (function codes 3 and 4) may ask for.
const MAX_READ_REGISTERS: usize = 125;
/// Most bits a single read (function codes 1 and 2) may ask for.
const MAX_READ_BITS: usize = 2_000;
/// Most registers a single write (function code 16) may carry.
const MAX_WRITE_REGISTERS: usize = 123;
/// Most coils a single write (function code 15) may carry.
const MAX_WRITE_BITS: usize = 1_968;

/// Shorter alias for the simulator handle.
pub type Simulator = SimHandle;

/// One of the four Modbus data tables of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Read-write bits (function codes 1, 5, 15).
    Coils,
    /// Read-only bits (function code 2).
    DiscreteInputs,
    /// Read-only 16-bit registers (function code 4).
    InputRegisters,
    /// Read-write 16-bit registers (function codes 3, 6, 16).
    HoldingRegisters,
}

impl Table {
    /// Whether the table holds bits rather than 16-bit registers.
    #[must_use]
    pub fn is_bits(self) -> bool {
        matches!(self, Self::Coils | Self::DiscreteInputs)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Coils => "coils",
            Self::DiscreteInputs => "discrete inputs",
            Self::InputRegisters => "input registers",
            Self::HoldingRegisters => "holding registers",
        })
    }
}

/// Number of items in each bank of every simulated unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BankSizes {
    /// Number of coils (capped at [`MAX_BANK_SIZE`]).
    pub coils: usize,
    /// Number of discrete inputs (capped at [`MAX_BANK_SIZE`]).
    pub discrete_inputs: usize,
    /// Number of input registers (capped at [`MAX_BANK_SIZE`]).
    pub input_registers: usize,
    /// Number of holding registers (capped at [`MAX_BANK_SIZE`]).
    pub holding_registers: usize,
}

impl BankSizes {
    /// The same size for all four banks.
    #[must_use]
    pub fn uniform(size: usize) -> Self {
        Self {
            coils: size,
            discrete_inputs: size,
            input_registers: size,
            holding_registers: size,
        }
    }
}

impl Default for BankSizes {
    fn default() -> Self {
        Self::uniform(DEFAULT_BANK_SIZE)
    }
}

/// What the simulator does with a request for a unit id it does not simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownUnit {
    /// Never answer, like a gateway whose slave is dead (the client times out).
    #[default]
    NoAnswer,
    /// Answer with this exception code (0x0B, gateway target device failed to respond, is
    /// what a real gateway sends).
    Exception(u8),
}

/// Configuration of a simulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Unit ids to simulate (duplicates are ignored).
    pub unit_ids: Vec<u8>,
    /// Size of each bank of every unit.
    pub sizes: BankSizes,
    /// Behaviour for requests addressed to a unit id not in `unit_ids`.
    pub unknown_unit: UnknownUnit,
}

impl Default for SimConfig {
    /// One unit, id 1, with [`DEFAULT_BANK_SIZE`] items per bank.
    fn default() -> Self {
        Self::with_units([1])
    }
}

impl SimConfig {
    /// Simulate these unit ids with default bank sizes.
    #[must_use]
    pub fn with_units(unit_ids: impl IntoIterator<Item = u8>) -> Self {
        Self {
            unit_ids: unit_ids.into_iter().collect(),
            sizes: BankSizes::default(),
            unknown_unit: UnknownUnit::default(),
        }
    }

    /// Replace the bank sizes.
    #[must_use]
    pub fn sizes(mut self, sizes: BankSizes) -> Self {
        self.sizes = sizes;
        self
    }

    /// Replace the behaviour for unknown unit ids.
    #[must_use]
    pub fn unknown_unit(mut self, unknown_unit: UnknownUnit) -> Self {
        self.unknown_unit = unknown_unit;
        self
    }
}

/// A fault injected into one unit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behave normally.
    #[default]
    None,
    /// Never reply to any request (writes are not applied either).
    NoAnswer,
    /// Close the connection that carried a request for this unit, without replying
    /// (writes are not applied). Reconnecting works; the next request drops again.
    Disconnect,
    /// Serve requests normally but send each reply this long after the request arrived.
    /// Requests on one connection are served in order, so a delay also holds back the
    /// requests queued behind it.
    Delay(Duration),
    /// Answer every request with this exception code (writes are not applied).
    Exception(u8),
    /// Answer requests that touch `addr_range` of `table` with exception `code`; serve
    /// all other requests normally.
    ExceptionAt {
        /// The table whose addresses fail.
        table: Table,
        /// The failing addresses (end exclusive).
        addr_range: Range<u16>,
        /// The exception code sent back.
        code: u8,
    },
}

/// Order of the 16-bit words of a multi-word value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WordOrder {
    /// Most significant word first: ABCD for 32 bits, ABCDEFGH for 64 bits.
    #[default]
    BigEndian,
    /// Least significant word first, bytes in each word big-endian: CDAB for 32 bits,
    /// GHEFCDAB for 64 bits.
    WordSwapped,
}

/// How a numeric script value is written into registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// One register, unsigned (rounded and clamped to 0..=65535).
    U16,
    /// One register, two's complement (rounded and clamped to -32768..=32767).
    I16,
    /// Two registers, unsigned (rounded and clamped).
    U32(WordOrder),
    /// Two registers, two's complement (rounded and clamped).
    I32(WordOrder),
    /// Two registers, IEEE 754 single precision.
    F32(WordOrder),
    /// Four registers, IEEE 754 double precision.
    F64(WordOrder),
}

impl Encoding {
    /// Number of 16-bit registers a value occupies.
    #[must_use]
    pub fn words(self) -> usize {
        match self {
            Self::U16 | Self::I16 => 1,
            Self::U32(_) | Self::I32(_) | Self::F32(_) => 2,
            Self::F64(_) => 4,
        }
    }

    /// Encode `value` into registers.
    #[must_use]
    pub fn encode(self, value: f64) -> Vec<u16> {
        let (words, len) = self.encode_array(value);
        words[..len].to_vec()
    }

    /// Decode registers written by [`Encoding::encode`]; `None` if `words` has the wrong length.
    #[must_use]
    pub fn decode(self, words: &[u16]) -> Option<f64> {
        if words.len() != self.words() {
            return None;
        }
        let big_endian = |order: WordOrder| -> u64 {
            let fold = |acc: u64, w: &u16| (acc << 16) | u64::from(*w);
            match order {
                WordOrder::BigEndian => words.iter().fold(0, fold),
                WordOrder::WordSwapped => words.iter().rev().fold(0, fold),
            }
        };
        Some(match self {
            Self::U16 => f64::from(words[0]),
            Self::I16 => f64::from(words[0] as i16),
            Self::U32(order) => big_endian(order) as f64,
            Self::I32(order) => f64::from(big_endian(order) as u32 as i32),
            Self::F32(order) => f64::from(f32::from_bits(big_endian(order) as u32)),
            Self::F64(order) => f64::from_bits(big_endian(order)),
        })
    }

    /// Encode without allocating: the words and how many of them are used.
    fn encode_array(self, value: f64) -> ([u16; 4], usize) {
        // Float to integer `as` casts saturate and map NaN to 0, which is the clamping we want.
        let bits: u64 = match self {
            Self::U16 => u64::from(value.round() as u16),
            Self::I16 => u64::from(value.round() as i16 as u16),
            Self::U32(_) => u64::from(value.round() as u32),
            Self::I32(_) => u64::from(value.round() as i32 as u32),
            Self::F32(_) => u64::from((value as f32).to_bits()),
            Self::F64(_) => value.to_bits(),
        };
        let len = self.words();
        let order = match self {
            Self::U16 | Self::I16 => WordOrder::BigEndian,
            Self::U32(o) | Self::I32(o) | Self::F32(o) | Self::F64(o) => o,
        };
        let mut words = [0u16; 4];
        for (i, word) in words.iter_mut().take(len).enumerate() {
            // Word i counted from the most significant end.
            let shift = 16 * (len - 1 - i);
            *word = (bits >> shift) as u16;
        }
        if order == WordOrder::WordSwapped {
            words[..len].reverse();
        }
        (words, len)
    }
}

/// Encode an `f32` into two registers.
#[must_use]
pub fn encode_f32(value: f32, order: WordOrder) -> [u16; 2] {
    let bits = value.to_bits();
    let (hi, lo) = ((bits >> 16) as u16, bits as u16);
    match order {
        WordOrder::BigEndian => [hi, lo],
        WordOrder::WordSwapped => [lo, hi],
    }
}

/// Decode an `f32` from two registers.
#[must_use]
pub fn decode_f32(words: [u16; 2], order: WordOrder) -> f32 {
    let (hi, lo) = match order {
        WordOrder::BigEndian => (words[0], words[1]),
        WordOrder::WordSwapped => (words[1], words[0]),
    };
    f32::from_bits((u32::from(hi) << 16) | u32::from(lo))
}

/// A value driven over time by a background task, one write per tick.
///
/// The first write happens when the script is added; tick `n` (counting from 0) writes the
/// value described for each variant. On coils and discrete inputs only one-word scripts are
/// allowed and the bit is the lowest bit of the word, so `Counter { step: 1 }` toggles.
#[derive(Debug, Clone, PartialEq)]
pub enum Script {
    /// One register counting up from its value when the script was added, `step` per tick,
    /// wrapping at 65536.
    Counter {
        /// Added each tick (wrapping).
        step: u16,
    },
    /// A sawtooth: `from + n * step`, restarting at `from` once it passes `to`.
    Ramp {
        /// First value.
        from: f64,
        /// Last value (inclusive); `step` must point from `from` towards `to`.
        to: f64,
        /// Added each tick; non-zero unless `from == to`.
        step: f64,
        /// How the value is written.
        encoding: Encoding,
    },
    /// `offset + amplitude * sin(2π t / period)`, `t` being the time since the script was
    /// added (tokio time, so paused-time tests are deterministic).
    Sine {
        /// Peak deviation from `offset`.
        amplitude: f64,
        /// Centre value.
        offset: f64,
        /// Time for one full wave; non-zero.
        period: Duration,
        /// How the value is written.
        encoding: Encoding,
    },
    /// The same register value on every tick (overrides writes from clients).
    Fixed(u16),
}

impl Script {
    /// A float32 big-endian (ABCD) sine, the common case.
    #[must_use]
    pub fn sine_f32(amplitude: f64, offset: f64, period: Duration) -> Self {
        Self::Sine {
            amplitude,
            offset,
            period,
            encoding: Encoding::F32(WordOrder::BigEndian),
        }
    }

    /// Number of registers (or bits) the script writes.
    #[must_use]
    pub fn words(&self) -> usize {
        match self {
            Self::Counter { .. } | Self::Fixed(_) => 1,
            Self::Ramp { encoding, .. } | Self::Sine { encoding, .. } => encoding.words(),
        }
    }

    /// Check the parameters; the error names the problem.
    fn validate(&self) -> Result<(), &'static str> {
        match self {
            Self::Counter { .. } | Self::Fixed(_) => Ok(()),
            Self::Ramp { from, to, step, .. } => {
                if !(from.is_finite() && to.is_finite() && step.is_finite()) {
                    Err("ramp bounds and step must be finite")
                } else if from != to && (*step == 0.0 || (to - from).signum() != step.signum()) {
                    Err("ramp step must be non-zero and point from `from` towards `to`")
                } else {
                    Ok(())
                }
            }
            Self::Sine {
                amplitude,
                offset,
                period,
                ..
            } => {
                if !(amplitude.is_finite() && offset.is_finite()) {
                    Err("sine amplitude and offset must be finite")
                } else if period.is_zero() {
                    Err("sine period must be non-zero")
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Identifies a running script, for [`SimHandle::remove_script`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScriptId(u64);

/// Errors of the simulator's test controls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The unit id is not simulated by this server.
    #[error("unit {0} is not simulated")]
    UnknownUnit(u8),
    /// The addressed items do not fit in the bank.
    #[error("{table} {addr} (+{len}) is outside the bank of {size}")]
    OutOfRange {
        /// The table addressed.
        table: Table,
        /// First address.
        addr: u16,
        /// Number of items.
        len: usize,
        /// Size of the bank.
        size: usize,
    },
    /// The script parameters are unusable.
    #[error("invalid script: {0}")]
    InvalidScript(&'static str),
}

/// The four banks and the fault of one unit, guarded together by one mutex.
#[derive(Debug)]
struct UnitData {
    coils: Vec<bool>,
    discrete: Vec<bool>,
    input: Vec<u16>,
    holding: Vec<u16>,
    fault: Fault,
}

impl UnitData {
    fn new(sizes: BankSizes) -> Self {
        Self {
            coils: vec![false; sizes.coils.min(MAX_BANK_SIZE)],
            discrete: vec![false; sizes.discrete_inputs.min(MAX_BANK_SIZE)],
            input: vec![0; sizes.input_registers.min(MAX_BANK_SIZE)],
            holding: vec![0; sizes.holding_registers.min(MAX_BANK_SIZE)],
            fault: Fault::None,
        }
    }

    fn size(&self, table: Table) -> usize {
        match table {
            Table::Coils => self.coils.len(),
            Table::DiscreteInputs => self.discrete.len(),
            Table::InputRegisters => self.input.len(),
            Table::HoldingRegisters => self.holding.len(),
        }
    }

    /// The index range `addr..addr + len`, if it fits in the bank.
    fn range(&self, table: Table, addr: u16, len: usize) -> Option<Range<usize>> {
        let start = usize::from(addr);
        let end = start.checked_add(len)?;
        (end <= self.size(table)).then_some(start..end)
    }

    fn checked_range(&self, table: Table, addr: u16, len: usize) -> Result<Range<usize>, SimError> {
        self.range(table, addr, len).ok_or(SimError::OutOfRange {
            table,
            addr,
            len,
            size: self.size(table),
        })
    }

    fn words_mut(&mut self, table: Table) -> Option<&mut Vec<u16>> {
        match table {
            Table::InputRegisters => Some(&mut self.input),
            Table::HoldingRegisters => Some(&mut self.holding),
            Table::Coils | Table::DiscreteInputs => None,
        }
    }

    fn bits_mut(&mut self, table: Table) -> Option<&mut Vec<bool>> {
        match table {
            Table::Coils => Some(&mut self.coils),
            Table::DiscreteInputs => Some(&mut self.discrete),
            Table::InputRegisters | Table::HoldingRegisters => None,
        }
    }

    /// Write words (or the lowest bit of each word, for bit tables) at an address already
    /// checked to fit.
    fn write_words(&mut self, table: Table, range: Range<usize>, words: &[u16]) {
        if let Some(bank) = self.words_mut(table) {
            bank[range].copy_from_slice(words);
        } else if let Some(bank) = self.bits_mut(table) {
            for (bit, word) in bank[range].iter_mut().zip(words) {
                *bit = word & 1 == 1;
            }
        }
    }

    /// Execute one Modbus request against the banks.
    fn execute(&mut self, request: &Request<'_>) -> Result<Response, ExceptionCode> {
        match request {
            Request::ReadCoils(addr, qty) => {
                let range = self.read_range(Table::Coils, *addr, *qty, MAX_READ_BITS)?;
                Ok(Response::ReadCoils(self.coils[range].to_vec()))
            }
            Request::ReadDiscreteInputs(addr, qty) => {
                let range = self.read_range(Table::DiscreteInputs, *addr, *qty, MAX_READ_BITS)?;
                Ok(Response::ReadDiscreteInputs(self.discrete[range].to_vec()))
            }
            Request::ReadHoldingRegisters(addr, qty) => {
                let range =
                    self.read_range(Table::HoldingRegisters, *addr, *qty, MAX_READ_REGISTERS)?;
                Ok(Response::ReadHoldingRegisters(self.holding[range].to_vec()))
            }
            Request::ReadInputRegisters(addr, qty) => {
                let range =
                    self.read_range(Table::InputRegisters, *addr, *qty, MAX_READ_REGISTERS)?;
                Ok(Response::ReadInputRegisters(self.input[range].to_vec()))
            }
            Request::WriteSingleCoil(addr, value) => {
                let range = self.address_range(Table::Coils, *addr, 1)?;
                self.coils[range].fill(*value);
                Ok(Response::WriteSingleCoil(*addr, *value))
            }
            Request::WriteSingleRegister(addr, value) => {
                let range = self.address_range(Table::HoldingRegisters, *addr, 1)?;
                self.holding[range].fill(*value);
                Ok(Response::WriteSingleRegister(*addr, *value))
            }
            Request::WriteMultipleCoils(addr, values) => {
                let qty = write_quantity(values.len(), MAX_WRITE_BITS)?;
                let range = self.address_range(Table::Coils, *addr, values.len())?;
                self.coils[range].copy_from_slice(values);
                Ok(Response::WriteMultipleCoils(*addr, qty))
            }
            Request::WriteMultipleRegisters(addr, values) => {
                let qty = write_quantity(values.len(), MAX_WRITE_REGISTERS)?;
                let range = self.address_range(Table::HoldingRegisters, *addr, values.len())?;
                self.holding[range].copy_from_slice(values);
                Ok(Response::WriteMultipleRegisters(*addr, qty))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }

    /// Quantity check (0x03) then address check (0x02), in the order the spec prescribes.
    fn read_range(
        &self,
        table: Table,
        addr: u16,
        qty: u16,
        max: usize,
    ) -> Result<Range<usize>, ExceptionCode> {
        let qty = usize::from(qty);
        if qty == 0 || qty > max {
            return Err(ExceptionCode::IllegalDataValue);
        }
        self.address_range(table, addr, qty)
    }

    fn address_range(
        &self,
        table: Table,
        addr: u16,
        len: usize,
    ) -> Result<Range<usize>, ExceptionCode> {
        self.range(table, addr, len)
            .ok_or(ExceptionCode::IllegalDataAddress)
    }
}

fn write_quantity(len: usize, max: usize) -> Result<u16, ExceptionCode> {
    if len == 0 || len > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    u16::try_from(len).map_err(|_| ExceptionCode::IllegalDataValue)
}

/// The table and address span a request touches, for [`Fault::ExceptionAt`].
fn request_span(request: &Request<'_>) -> Option<(Table, u32, u32)> {
    let (table, addr, len) = match request {
        Request::ReadCoils(a, q) => (Table::Coils, *a, usize::from(*q)),
        Request::ReadDiscreteInputs(a, q) => (Table::DiscreteInputs, *a, usize::from(*q)),
        Request::ReadHoldingRegisters(a, q) => (Table::HoldingRegisters, *a, usize::from(*q)),
        Request::ReadInputRegisters(a, q) => (Table::InputRegisters, *a, usize::from(*q)),
        Request::WriteSingleCoil(a, _) => (Table::Coils, *a, 1),
        Request::WriteSingleRegister(a, _) => (Table::HoldingRegisters, *a, 1),
        Request::WriteMultipleCoils(a, v) => (Table::Coils, *a, v.len()),
        Request::WriteMultipleRegisters(a, v) => (Table::HoldingRegisters, *a, v.len()),
        _ => return None,
    };
    let start = u32::from(addr);
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    Some((table, start, start.saturating_add(len)))
}

/// One request as it reached a unit, recorded while [`SimHandle::record_arrivals`] is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// When the simulator's service received the (fully decoded) request, on the tokio clock.
    pub at: Instant,
    /// The function code.
    pub function: u8,
    /// The table the request touches (`None` for function codes without an address).
    pub table: Option<Table>,
    /// First address touched (0 without a table).
    pub address: u16,
    /// Number of registers or bits touched (0 without a table).
    pub quantity: u16,
}

/// One simulated unit: its data and its counters.
struct Unit {
    data: Mutex<UnitData>,
    requests: AtomicU64,
    by_function: [AtomicU64; 256],
    /// Arrivals since recording was switched on; `None` while it is off.
    arrivals: Mutex<Option<Vec<Arrival>>>,
}

impl Unit {
    fn new(sizes: BankSizes) -> Self {
        Self {
            data: Mutex::new(UnitData::new(sizes)),
            requests: AtomicU64::new(0),
            by_function: std::array::from_fn(|_| AtomicU64::new(0)),
            arrivals: Mutex::new(None),
        }
    }

    fn arrivals(&self) -> MutexGuard<'_, Option<Vec<Arrival>>> {
        self.arrivals.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Note the request's arrival if recording is on.
    fn record(&self, function: u8, request: &Request<'_>) {
        let at = Instant::now();
        if let Some(log) = self.arrivals().as_mut() {
            let (table, address, quantity) = match request_span(request) {
                Some((table, start, end)) => (
                    Some(table),
                    u16::try_from(start).unwrap_or(u16::MAX),
                    u16::try_from(end - start).unwrap_or(u16::MAX),
                ),
                None => (None, 0, 0),
            };
            log.push(Arrival {
                at,
                function,
                table,
                address,
                quantity,
            });
        }
    }

    /// Lock the unit's data; a panic elsewhere while holding the lock leaves plain data
    /// behind, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, UnitData> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Count, apply the fault, execute.
    fn serve(&self, request: &Request<'_>) -> Served {
        let function = request.function_code().value();
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.by_function[usize::from(function)].fetch_add(1, Ordering::Relaxed);
        self.record(function, request);

        let mut data = self.lock();
        let delay = match &data.fault {
            Fault::None => None,
            Fault::NoAnswer => return Served::Reply(SimFuture::ready(Ok(None))),
            Fault::Disconnect => return Served::Disconnect,
            Fault::Exception(code) => {
                return Served::Reply(SimFuture::ready(Err(ExceptionCode::new(*code))));
            }
            Fault::ExceptionAt {
                table,
                addr_range,
                code,
            } => {
                if let Some((t, start, end)) = request_span(request)
                    && t == *table
                    && start < u32::from(addr_range.end)
                    && u32::from(addr_range.start) < end
                {
                    return Served::Reply(SimFuture::ready(Err(ExceptionCode::new(*code))));
                }
                None
            }
            Fault::Delay(delay) => Some(*delay),
        };
        let outcome = data.execute(request).map(Some);
        drop(data);
        Served::Reply(match delay {
            None => SimFuture::ready(outcome),
            Some(delay) => SimFuture::delayed(delay, outcome),
        })
    }
}

/// What a unit does with a request.
enum Served {
    /// Reply (or stay silent) when the future completes.
    Reply(SimFuture),
    /// Close the connection without replying.
    Disconnect,
}

/// All units of a server, indexed by unit id.
struct Units {
    by_id: Vec<Option<Arc<Unit>>>,
    ids: Vec<u8>,
    unknown_unit: UnknownUnit,
    unknown_requests: AtomicU64,
    accepted_connections: AtomicU64,
    active_connections: AtomicU64,
}

impl Units {
    fn new(config: &SimConfig) -> Self {
        let mut by_id: Vec<Option<Arc<Unit>>> = (0..256).map(|_| None).collect();
        let mut ids = Vec::new();
        for &id in &config.unit_ids {
            let slot = &mut by_id[usize::from(id)];
            if slot.is_none() {
                *slot = Some(Arc::new(Unit::new(config.sizes)));
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Self {
            by_id,
            ids,
            unknown_unit: config.unknown_unit,
            unknown_requests: AtomicU64::new(0),
            accepted_connections: AtomicU64::new(0),
            active_connections: AtomicU64::new(0),
        }
    }

    fn get(&self, unit: u8) -> Option<&Arc<Unit>> {
        self.by_id.get(usize::from(unit)).and_then(Option::as_ref)
    }
}

type Outcome = Result<Option<Response>, ExceptionCode>;

/// The future of one request: ready at once, or after a delay. Avoids boxing per request.
enum SimFuture {
    Ready(Option<Outcome>),
    Delayed {
        sleep: Pin<Box<Sleep>>,
        outcome: Option<Outcome>,
    },
}

impl SimFuture {
    fn ready(outcome: Outcome) -> Self {
        Self::Ready(Some(outcome))
    }

    fn delayed(delay: Duration, outcome: Outcome) -> Self {
        Self::Delayed {
            sleep: Box::pin(tokio::time::sleep(delay)),
            outcome: Some(outcome),
        }
    }
}

impl Future for SimFuture {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match self.get_mut() {
            Self::Ready(outcome) => Poll::Ready(outcome.take().unwrap_or(Ok(None))),
            Self::Delayed { sleep, outcome } => match sleep.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => Poll::Ready(outcome.take().unwrap_or(Ok(None))),
            },
        }
    }
}

/// The tokio-modbus service of one connection.
struct SimService {
    units: Arc<Units>,
    /// Shared with the connection's [`SimStream`]: set to close the connection.
    kill: Arc<AtomicBool>,
}

impl Service for SimService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = SimFuture;

    fn call(&self, req: Self::Request) -> Self::Future {
        match self.units.get(req.slave) {
            Some(unit) => match unit.serve(&req.request) {
                Served::Reply(future) => future,
                Served::Disconnect => {
                    // The request loop reads the stream next and finds it closed.
                    self.kill.store(true, Ordering::Relaxed);
                    SimFuture::ready(Ok(None))
                }
            },
            None => {
                self.units.unknown_requests.fetch_add(1, Ordering::Relaxed);
                match self.units.unknown_unit {
                    UnknownUnit::NoAnswer => SimFuture::ready(Ok(None)),
                    UnknownUnit::Exception(code) => SimFuture::ready(Err(ExceptionCode::new(code))),
                }
            }
        }
    }
}

/// A connection's TCP stream that reads as closed once its connection is to be dropped.
struct SimStream {
    stream: TcpStream,
    /// Set by the connection's service for [`Fault::Disconnect`].
    kill: Arc<AtomicBool>,
    /// Completes when [`SimHandle::drop_connections`] is called (or the simulator is gone).
    dropped: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Latched once the connection is to be closed; `dropped` is not polled again.
    closed: bool,
    units: Arc<Units>,
}

impl SimStream {
    /// Wrap an accepted stream and count it as active until dropped.
    fn new(
        stream: TcpStream,
        units: Arc<Units>,
        kill: Arc<AtomicBool>,
        mut drops: watch::Receiver<u64>,
    ) -> Self {
        drops.mark_unchanged();
        units.accepted_connections.fetch_add(1, Ordering::Relaxed);
        units.active_connections.fetch_add(1, Ordering::Relaxed);
        Self {
            stream,
            kill,
            dropped: Box::pin(async move {
                // An error means the simulator is gone: close as well.
                let _ = drops.changed().await;
            }),
            closed: false,
            units,
        }
    }

    /// Whether the connection is to be closed; registers for the drop signal otherwise.
    fn closing(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.closed
            && (self.kill.load(Ordering::Relaxed) || self.dropped.as_mut().poll(cx).is_ready())
        {
            self.closed = true;
        }
        self.closed
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        self.units
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing(cx) {
            // End of stream: the server's request loop ends and drops the socket.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Shared state behind every clone of a [`SimHandle`]; dropping it stops everything.
struct Inner {
    local_addr: SocketAddr,
    units: Arc<Units>,
    /// Bumped by [`SimHandle::drop_connections`].
    drops: watch::Sender<u64>,
    runtime: Handle,
    server: AbortHandle,
    scripts: Mutex<HashMap<ScriptId, AbortHandle>>,
    next_script: AtomicU64,
}

impl Inner {
    fn scripts(&self) -> MutexGuard<'_, HashMap<ScriptId, AbortHandle>> {
        self.scripts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop(&self) {
        self.server.abort();
        for (_, script) in self.scripts().drain() {
            script.abort();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running simulator; cheap to clone. The server stops when the last clone is dropped or
/// on [`SimHandle::shutdown`].
#[derive(Clone)]
pub struct SimHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("local_addr", &self.inner.local_addr)
            .field("units", &self.inner.units.ids)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// Bind `bind` (port 0 picks a free port) and serve the configured units on the current
    /// tokio runtime.
    ///
    /// # Errors
    /// Binding the listener failed.
    pub async fn start(bind: SocketAddr, config: SimConfig) -> io::Result<SimHandle> {
        let listener = TcpListener::bind(bind).await?;
        let local_addr = listener.local_addr()?;
        let units = Arc::new(Units::new(&config));
        let (drops, drops_rx) = watch::channel(0u64);
        let server_units = Arc::clone(&units);
        let server = tokio::spawn(async move {
            let server = Server::new(listener);
            let on_connected = |stream: TcpStream, peer: SocketAddr| {
                let units = Arc::clone(&server_units);
                let drops = drops_rx.clone();
                async move {
                    if let Err(err) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, %err, "plc sim: cannot set TCP_NODELAY");
                    }
                    tracing::trace!(%peer, "plc sim: connection accepted");
                    let kill = Arc::new(AtomicBool::new(false));
                    let service = SimService {
                        units: Arc::clone(&units),
                        kill: Arc::clone(&kill),
                    };
                    Ok(Some((service, SimStream::new(stream, units, kill, drops))))
                }
            };
            let on_process_error = |err: io::Error| {
                tracing::debug!(%err, "plc sim: connection ended with an error");
            };
            if let Err(err) = server.serve(&on_connected, on_process_error).await {
                tracing::warn!(%err, "plc sim: listener failed, server stopped");
            }
        });
        Ok(SimHandle {
            inner: Arc::new(Inner {
                local_addr,
                units,
                drops,
                runtime: Handle::current(),
                server: server.abort_handle(),
                scripts: Mutex::new(HashMap::new()),
                next_script: AtomicU64::new(0),
            }),
        })
    }

    /// The address the server listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The simulated unit ids, ascending.
    #[must_use]
    pub fn unit_ids(&self) -> &[u8] {
        &self.inner.units.ids
    }

    /// Close every open client connection (the listener stays up, so clients can
    /// reconnect), as a PLC reboot or a network blip would.
    pub fn drop_connections(&self) {
        self.inner.drops.send_modify(|generation| *generation += 1);
    }

    /// Connections accepted since the server started.
    #[must_use]
    pub fn accepted_connections(&self) -> u64 {
        self.inner
            .units
            .accepted_connections
            .load(Ordering::Relaxed)
    }

    /// Connections currently open.
    #[must_use]
    pub fn active_connections(&self) -> u64 {
        self.inner.units.active_connections.load(Ordering::Relaxed)
    }

    /// Stop listening, close every connection and stop every script. Idempotent; the
    /// banks stay readable through this handle.
    pub fn shutdown(&self) {
        self.inner.stop();
    }

    fn unit(&self, unit: u8) -> Result<&Arc<Unit>, SimError> {
        self.inner
            .units
            .get(unit)
            .ok_or(SimError::UnknownUnit(unit))
    }

    fn write_words(
        &self,
        unit: u8,
        table: Table,
        addr: u16,
        values: &[u16],
    ) -> Result<(), SimError> {
        let mut data = self.unit(unit)?.lock();
        let range = data.checked_range(table, addr, values.len())?;
        data.write_words(table, range, values);
        Ok(())
    }

    fn read_words(
        &self,
        unit: u8,
        table: Table,
        addr: u16,
        count: usize,
    ) -> Result<Vec<u16>, SimError> {
        let data = self.unit(unit)?.lock();
        let range = data.checked_range(table, addr, count)?;
        Ok(match table {
            Table::InputRegisters => data.input[range].to_vec(),
            Table::HoldingRegisters => data.holding[range].to_vec(),
            Table::Coils => data.coils[range].iter().map(|&b| u16::from(b)).collect(),
            Table::DiscreteInputs => data.discrete[range].iter().map(|&b| u16::from(b)).collect(),
        })
    }

    /// Set holding registers starting at `addr`.
    ///
    /// # Errors
    /// Unknown unit, or the values do not fit in the bank.
    pub fn set_holding(&self, unit: u8, addr: u16, values: &[u16]) -> Result<(), SimError> {
        self.write_words(unit, Table::HoldingRegisters, addr, values)
    }

    /// Read `count` holding registers starting at `addr`.
    ///
    /// # Errors
    /// Unknown unit, or the range does not fit in the bank.
    pub fn holding(&self, unit: u8, addr: u16, count: usize) -> Result<Vec<u16>, SimError> {
        self.read_words(unit, Table::HoldingRegisters, addr, count)
    }

    /// Set input registers starting at `addr`.
    ///
    /// # Errors
    /// Unknown unit, or the values do not fit in the bank.
    pub fn set_input(&self, unit: u8, addr: u16, values: &[u16]) -> Result<(), SimError> {
        self.write_words(unit, Table::InputRegisters, addr, values)
    }

    /// Read `count` input registers starting at `addr`.
    ///
    /// # Errors
    /// Unknown unit, or the range does not fit in the bank.
    pub fn input(&self, unit: u8, addr: u16, count: usize) -> Result<Vec<u16>, SimError> {
        self.read_words(unit, Table::InputRegisters, addr, count)
    }

    /// Set one coil.
    ///
    /// # Errors
    /// Unknown unit, or the address is outside the bank.
    pub fn set_coil(&self, unit: u8, addr: u16, value: bool) -> Result<(), SimError> {
        self.write_words(unit, Table::Coils, addr, &[u16::from(value)])
    }

    /// Read one coil.
    ///
    /// # Errors
    /// Unknown unit, or the address is outside the bank.
    pub fn coil(&self, unit: u8, addr: u16) -> Result<bool, SimError> {
        Ok(self.read_words(unit, Table::Coils, addr, 1)?.first() == Some(&1))
    }

    /// Set one discrete input.
    ///
    /// # Errors
    /// Unknown unit, or the address is outside the bank.
    pub fn set_discrete(&self, unit: u8, addr: u16, value: bool) -> Result<(), SimError> {
        self.write_words(unit, Table::DiscreteInputs, addr, &[u16::from(value)])
    }

    /// Read one discrete input.
    ///
    /// # Errors
    /// Unknown unit, or the address is outside the bank.
    pub fn discrete(&self, unit: u8, addr: u16) -> Result<bool, SimError> {
        Ok(self
            .read_words(unit, Table::DiscreteInputs, addr, 1)?
            .first()
            == Some(&1))
    }

    /// Write `value` into registers of `table` using `encoding` (e.g. a float32 CDAB).
    ///
    /// # Errors
    /// Unknown unit, a bit table, or the words do not fit in the bank.
    pub fn set_value(
        &self,
        unit: u8,
        table: Table,
        addr: u16,
        value: f64,
        encoding: Encoding,
    ) -> Result<(), SimError> {
        if table.is_bits() {
            return Err(SimError::InvalidScript(
                "encoded values need a register table",
            ));
        }
        let (words, len) = encoding.encode_array(value);
        self.write_words(unit, table, addr, &words[..len])
    }

    /// Replace the fault of a unit; takes effect for the next request.
    ///
    /// # Errors
    /// Unknown unit.
    pub fn set_fault(&self, unit: u8, fault: Fault) -> Result<(), SimError> {
        self.unit(unit)?.lock().fault = fault;
        Ok(())
    }

    /// The current fault of a unit.
    ///
    /// # Errors
    /// Unknown unit.
    pub fn fault(&self, unit: u8) -> Result<Fault, SimError> {
        Ok(self.unit(unit)?.lock().fault.clone())
    }

    /// Requests received for `unit` (answered, faulted or not), 0 for a unit not simulated.
    #[must_use]
    pub fn request_count(&self, unit: u8) -> u64 {
        self.inner
            .units
            .get(unit)
            .map_or(0, |u| u.requests.load(Ordering::Relaxed))
    }

    /// Requests received for `unit` with function code `function` (e.g. 3 for read holding
    /// registers), 0 for a unit not simulated.
    #[must_use]
    pub fn request_count_fc(&self, unit: u8, function: u8) -> u64 {
        self.inner.units.get(unit).map_or(0, |u| {
            u.by_function[usize::from(function)].load(Ordering::Relaxed)
        })
    }

    /// Requests received for all simulated units together.
    #[must_use]
    pub fn total_requests(&self) -> u64 {
        self.inner
            .units
            .by_id
            .iter()
            .flatten()
            .map(|u| u.requests.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests received for unit ids that are not simulated.
    #[must_use]
    pub fn unknown_unit_requests(&self) -> u64 {
        self.inner.units.unknown_requests.load(Ordering::Relaxed)
    }

    /// Switch recording of request arrivals on (discarding anything recorded before) or off
    /// (discarding what was recorded), for every unit. Requests for units that are not
    /// simulated are never recorded.
    pub fn record_arrivals(&self, on: bool) {
        for unit in self.inner.units.by_id.iter().flatten() {
            *unit.arrivals() = on.then(Vec::new);
        }
    }

    /// The arrivals recorded for `unit` since recording was switched on or since the last
    /// call, oldest first; recording goes on. Empty for a unit not simulated or while
    /// recording is off.
    #[must_use]
    pub fn take_arrivals(&self, unit: u8) -> Vec<Arrival> {
        self.inner
            .units
            .get(unit)
            .and_then(|u| u.arrivals().as_mut().map(std::mem::take))
            .unwrap_or_default()
    }

    /// Reset the request counters of every unit (and of unknown units) to zero.
    pub fn reset_counters(&self) {
        for unit in self.inner.units.by_id.iter().flatten() {
            unit.requests.store(0, Ordering::Relaxed);
            for counter in &unit.by_function {
                counter.store(0, Ordering::Relaxed);
            }
        }
        self.inner
            .units
            .unknown_requests
            .store(0, Ordering::Relaxed);
    }

    /// Drive `table[addr..]` of `unit` with `script`, one write every `tick`, starting now.
    ///
    /// # Errors
    /// Unknown unit, the script does not fit in the bank, a multi-word script on a bit table,
    /// invalid script parameters, or a zero tick.
    pub fn add_script(
        &self,
        unit: u8,
        table: Table,
        addr: u16,
        script: Script,
        tick: Duration,
    ) -> Result<ScriptId, SimError> {
        script.validate().map_err(SimError::InvalidScript)?;
        if tick.is_zero() {
            return Err(SimError::InvalidScript("tick must be non-zero"));
        }
        let words = script.words();
        if table.is_bits() && words != 1 {
            return Err(SimError::InvalidScript(
                "scripts on coils and discrete inputs must be one word wide",
            ));
        }
        let unit_state = Arc::clone(self.unit(unit)?);
        let started = Instant::now();
        let first_tick = started
            .checked_add(tick)
            .ok_or(SimError::InvalidScript("tick is too long"))?;
        let (range, runner) = {
            let mut data = unit_state.lock();
            let range = data.checked_range(table, addr, words)?;
            let start = match table {
                Table::InputRegisters => data.input[range.start],
                Table::HoldingRegisters => data.holding[range.start],
                Table::Coils => u16::from(data.coils[range.start]),
                Table::DiscreteInputs => u16::from(data.discrete[range.start]),
            };
            // Tick 0 is written right away, so the value is in place when this returns.
            let mut runner = ScriptRunner::new(script, start);
            let (words, len) = runner.next(Duration::ZERO);
            data.write_words(table, range.clone(), &words[..len]);
            (range, runner)
        };
        let task = self
            .inner
            .runtime
            .spawn(runner.run(unit_state, table, range, first_tick, tick));
        let id = ScriptId(self.inner.next_script.fetch_add(1, Ordering::Relaxed));
        self.inner.scripts().insert(id, task.abort_handle());
        Ok(id)
    }

    /// Stop a script; the registers keep their last value. Returns whether it was running.
    pub fn remove_script(&self, id: ScriptId) -> bool {
        match self.inner.scripts().remove(&id) {
            Some(task) => {
                task.abort();
                true
            }
            None => false,
        }
    }
}

/// The state of one script between ticks.
struct ScriptRunner {
    script: Script,
    counter: u16,
    ramp: f64,
}

impl ScriptRunner {
    fn new(script: Script, counter_start: u16) -> Self {
        let ramp = match &script {
            Script::Ramp { from, .. } => *from,
            _ => 0.0,
        };
        Self {
            script,
            counter: counter_start,
            ramp,
        }
    }

    /// The words for this tick, then advance.
    fn next(&mut self, elapsed: Duration) -> ([u16; 4], usize) {
        match &self.script {
            Script::Counter { step } => {
                let value = self.counter;
                self.counter = self.counter.wrapping_add(*step);
                ([value, 0, 0, 0], 1)
            }
            Script::Fixed(value) => ([*value, 0, 0, 0], 1),
            Script::Ramp {
                from,
                to,
                step,
                encoding,
            } => {
                let value = self.ramp;
                let next = value + step;
                let passed = (*step > 0.0 && next > *to) || (*step < 0.0 && next < *to);
                self.ramp = if passed || from == to { *from } else { next };
                encoding.encode_array(value)
            }
            Script::Sine {
                amplitude,
                offset,
                period,
                encoding,
            } => {
                let phase = elapsed.as_secs_f64() / period.as_secs_f64();
                let value = offset + amplitude * (std::f64::consts::TAU * phase).sin();
                encoding.encode_array(value)
            }
        }
    }

    /// Write ticks 1, 2, ... (tick 0 was written by `add_script`); the elapsed time of a
    /// tick is measured from tick 0.
    async fn run(
        mut self,
        unit: Arc<Unit>,
        table: Table,
        range: Range<usize>,
        first_tick: Instant,
        tick: Duration,
    ) {
        let start = first_tick.checked_sub(tick).unwrap_or(first_tick);
        let mut interval = tokio::time::interval_at(first_tick, tick);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            interval.tick().await;
            let (words, len) = self.next(start.elapsed());
            unit.lock().write_words(table, range.clone(), &words[..len]);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use tokio::time::{Instant, sleep, timeout};
    use tokio_modbus::{
        ExceptionCode, Request,
        client::{Context, tcp::connect_slave},
        prelude::{Client, Reader, Slave, Writer},
    };

    use super::*;

    /// Bound for any single client call that is expected to be answered.
    const CALL: Duration = Duration::from_secs(5);

    async fn sim(units: impl IntoIterator<Item = u8>) -> SimHandle {
        SimHandle::start("127.0.0.1:0".parse().unwrap(), SimConfig::with_units(units))
            .await
            .unwrap()
    }

    async fn client(sim: &SimHandle, unit: u8) -> Context {
        timeout(CALL, connect_slave(sim.local_addr(), Slave(unit)))
            .await
            .unwrap()
            .unwrap()
    }

    async fn read_holding(
        ctx: &mut Context,
        addr: u16,
        qty: u16,
    ) -> Result<Vec<u16>, ExceptionCode> {
        timeout(CALL, ctx.read_holding_registers(addr, qty))
            .await
            .expect("answered in time")
            .expect("transport ok")
    }

    #[tokio::test]
    async fn reads_and_writes_every_table() {
        let sim = sim([1]).await;
        let mut ctx = client(&sim, 1).await;

        sim.set_holding(1, 10, &[1, 2, 3]).unwrap();
        assert_eq!(read_holding(&mut ctx, 10, 3).await, Ok(vec![1, 2, 3]));
        ctx.write_multiple_registers(20, &[7, 8])
            .await
            .unwrap()
            .unwrap();
        ctx.write_single_register(22, 9).await.unwrap().unwrap();
        assert_eq!(sim.holding(1, 20, 3).unwrap(), vec![7, 8, 9]);

        sim.set_input(1, 5, &[0xBEEF, 42]).unwrap();
        let input = ctx.read_input_registers(5, 2).await.unwrap().unwrap();
        assert_eq!(input, vec![0xBEEF, 42]);
        assert_eq!(sim.input(1, 5, 2).unwrap(), vec![0xBEEF, 42]);

        sim.set_coil(1, 3, true).unwrap();
        let coils = ctx.read_coils(0, 5).await.unwrap().unwrap();
        assert_eq!(&coils[..5], &[false, false, false, true, false]);
        ctx.write_single_coil(0, true).await.unwrap().unwrap();
        ctx.write_multiple_coils(7, &[true, false, true])
            .await
            .unwrap()
            .unwrap();
        assert!(sim.coil(1, 0).unwrap());
        assert!(sim.coil(1, 7).unwrap());
        assert!(!sim.coil(1, 8).unwrap());
        assert!(sim.coil(1, 9).unwrap());

        sim.set_discrete(1, 9_999, true).unwrap();
        let discrete = ctx.read_discrete_inputs(9_998, 2).await.unwrap().unwrap();
        assert_eq!(&discrete[..2], &[false, true]);
        assert!(sim.discrete(1, 9_999).unwrap());
    }

    #[tokio::test]
    async fn bad_addresses_quantities_and_functions_get_exceptions() {
        let sim = sim([1]).await;
        let mut ctx = client(&sim, 1).await;

        // The last register is addressable, one past it is not.
        assert_eq!(read_holding(&mut ctx, 9_999, 1).await, Ok(vec![0]));
        assert_eq!(
            read_holding(&mut ctx, 9_999, 2).await,
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ctx.write_single_coil(10_000, true).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ctx.write_multiple_registers(9_999, &[1, 2]).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            sim.holding(1, 9_999, 1).unwrap(),
            vec![0],
            "rejected write not applied"
        );
        // More than 125 registers in one read is an illegal quantity.
        assert_eq!(
            read_holding(&mut ctx, 0, 126).await,
            Err(ExceptionCode::IllegalDataValue)
        );
        // Mask write (22) is not simulated.
        let masked = ctx
            .call(Request::MaskWriteRegister(0, 0xFF, 0))
            .await
            .unwrap();
        assert_eq!(masked, Err(ExceptionCode::IllegalFunction));
        // The connection is still usable.
        assert_eq!(read_holding(&mut ctx, 0, 1).await, Ok(vec![0]));
    }

    #[tokio::test]
    async fn units_are_separate_and_unknown_units_get_no_answer() {
        let sim = sim([1, 2]).await;
        assert_eq!(sim.unit_ids(), &[1, 2]);
        sim.set_holding(1, 0, &[11]).unwrap();
        sim.set_holding(2, 0, &[22]).unwrap();
        let mut one = client(&sim, 1).await;
        let mut two = client(&sim, 2).await;
        assert_eq!(read_holding(&mut one, 0, 1).await, Ok(vec![11]));
        assert_eq!(read_holding(&mut two, 0, 1).await, Ok(vec![22]));

        let mut nine = client(&sim, 9).await;
        let res = timeout(
            Duration::from_millis(300),
            nine.read_holding_registers(0, 1),
        )
        .await;
        assert!(res.is_err(), "unknown unit must not answer: {res:?}");
        assert_eq!(sim.unknown_unit_requests(), 1);
        assert!(matches!(
            sim.set_holding(9, 0, &[1]),
            Err(SimError::UnknownUnit(9))
        ));
    }

    #[tokio::test]
    async fn unknown_unit_can_answer_with_an_exception() {
        let config = SimConfig::with_units([1]).unknown_unit(UnknownUnit::Exception(0x0B));
        let sim = SimHandle::start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap();
        let mut ctx = client(&sim, 3).await;
        assert_eq!(
            read_holding(&mut ctx, 0, 1).await,
            Err(ExceptionCode::GatewayTargetDevice)
        );
    }

    #[tokio::test]
    async fn fault_no_answer_times_out_until_cleared() {
        let sim = sim([1, 2]).await;
        sim.set_fault(1, Fault::NoAnswer).unwrap();
        assert_eq!(sim.fault(1).unwrap(), Fault::NoAnswer);

        let mut ctx = client(&sim, 1).await;
        let res = timeout(Duration::from_millis(300), ctx.write_single_register(0, 5)).await;
        assert!(res.is_err(), "faulted unit must not answer: {res:?}");
        assert_eq!(sim.holding(1, 0, 1).unwrap(), vec![0], "write not applied");
        // Other units on the same server still answer.
        let mut two = client(&sim, 2).await;
        assert_eq!(read_holding(&mut two, 0, 1).await, Ok(vec![0]));

        sim.set_fault(1, Fault::None).unwrap();
        let mut fresh = client(&sim, 1).await;
        assert_eq!(read_holding(&mut fresh, 0, 1).await, Ok(vec![0]));
        assert_eq!(sim.request_count(1), 2, "unanswered requests are counted");
    }

    #[tokio::test]
    async fn fault_delay_answers_late() {
        let sim = sim([1]).await;
        sim.set_holding(1, 0, &[77]).unwrap();
        sim.set_fault(1, Fault::Delay(Duration::from_millis(250)))
            .unwrap();
        let mut ctx = client(&sim, 1).await;

        let started = Instant::now();
        assert_eq!(read_holding(&mut ctx, 0, 1).await, Ok(vec![77]));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250),
            "answered after {took:?}"
        );

        // A client with a shorter timeout gives up.
        let mut impatient = client(&sim, 1).await;
        let res = timeout(
            Duration::from_millis(50),
            impatient.read_holding_registers(0, 1),
        )
        .await;
        assert!(res.is_err());
    }

    #[tokio::test]
    async fn fault_exception_answers_every_request_with_the_code() {
        let sim = sim([1]).await;
        sim.set_fault(1, Fault::Exception(0x04)).unwrap();
        let mut ctx = client(&sim, 1).await;
        assert_eq!(
            read_holding(&mut ctx, 0, 1).await,
            Err(ExceptionCode::ServerDeviceFailure)
        );
        assert_eq!(
            ctx.write_single_register(0, 1).await.unwrap(),
            Err(ExceptionCode::ServerDeviceFailure)
        );
        assert_eq!(sim.holding(1, 0, 1).unwrap(), vec![0]);
        sim.set_fault(1, Fault::Exception(0x06)).unwrap();
        assert_eq!(
            ctx.read_coils(0, 1).await.unwrap(),
            Err(ExceptionCode::ServerDeviceBusy)
        );
    }

    #[tokio::test]
    async fn fault_exception_at_hits_only_overlapping_requests() {
        let sim = sim([1]).await;
        sim.set_fault(
            1,
            Fault::ExceptionAt {
                table: Table::HoldingRegisters,
                addr_range: 10..20,
                code: 0x02,
            },
        )
        .unwrap();
        let mut ctx = client(&sim, 1).await;
        assert_eq!(read_holding(&mut ctx, 0, 10).await, Ok(vec![0; 10]));
        assert_eq!(
            read_holding(&mut ctx, 5, 6).await,
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            read_holding(&mut ctx, 19, 1).await,
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            ctx.write_single_register(15, 1).await.unwrap(),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(read_holding(&mut ctx, 20, 5).await, Ok(vec![0; 5]));
        // Another table at the same addresses is unaffected.
        let input = ctx.read_input_registers(10, 10).await.unwrap();
        assert_eq!(input, Ok(vec![0; 10]));
    }

    #[tokio::test]
    async fn counts_requests_per_unit_and_function() {
        let sim = sim([1, 2]).await;
        let mut ctx = client(&sim, 1).await;
        for _ in 0..3 {
            read_holding(&mut ctx, 0, 10).await.unwrap();
        }
        ctx.write_single_register(0, 1).await.unwrap().unwrap();
        ctx.read_coils(0, 8).await.unwrap().unwrap();
        assert_eq!(sim.request_count(1), 5);
        assert_eq!(sim.request_count_fc(1, 3), 3);
        assert_eq!(sim.request_count_fc(1, 6), 1);
        assert_eq!(sim.request_count_fc(1, 1), 1);
        assert_eq!(sim.request_count_fc(1, 4), 0);
        assert_eq!(sim.request_count(2), 0);
        assert_eq!(sim.total_requests(), 5);
        sim.reset_counters();
        assert_eq!(sim.request_count(1), 0);
        assert_eq!(sim.request_count_fc(1, 3), 0);
    }

    #[tokio::test]
    async fn records_request_arrivals_only_while_switched_on() {
        let sim = sim([1, 2]).await;
        let mut ctx = client(&sim, 1).await;
        read_holding(&mut ctx, 0, 10).await.unwrap();
        assert!(
            sim.take_arrivals(1).is_empty(),
            "recording is off by default"
        );

        sim.record_arrivals(true);
        let before = Instant::now();
        read_holding(&mut ctx, 5, 10).await.unwrap();
        ctx.read_coils(3, 8).await.unwrap().unwrap();
        let after = Instant::now();
        let arrivals = sim.take_arrivals(1);
        assert_eq!(arrivals.len(), 2);
        assert_eq!(
            (
                arrivals[0].function,
                arrivals[0].table,
                arrivals[0].address,
                arrivals[0].quantity
            ),
            (3, Some(Table::HoldingRegisters), 5, 10)
        );
        assert_eq!(
            (
                arrivals[1].function,
                arrivals[1].table,
                arrivals[1].address,
                arrivals[1].quantity
            ),
            (1, Some(Table::Coils), 3, 8)
        );
        assert!(before <= arrivals[0].at && arrivals[0].at <= arrivals[1].at);
        assert!(arrivals[1].at <= after);
        assert!(sim.take_arrivals(1).is_empty(), "taken arrivals are gone");
        assert!(sim.take_arrivals(2).is_empty());
        assert!(sim.take_arrivals(9).is_empty(), "unknown unit");

        sim.record_arrivals(false);
        read_holding(&mut ctx, 0, 1).await.unwrap();
        assert!(sim.take_arrivals(1).is_empty());
    }

    #[tokio::test]
    async fn fault_disconnect_closes_the_connection() {
        let sim = sim([1, 2]).await;
        sim.set_fault(1, Fault::Disconnect).unwrap();
        let mut ctx = client(&sim, 1).await;
        let res = timeout(CALL, ctx.write_single_register(0, 9))
            .await
            .unwrap();
        assert!(res.is_err(), "transport error expected: {res:?}");
        assert_eq!(sim.holding(1, 0, 1).unwrap(), vec![0], "write not applied");
        eventually(|| sim.active_connections() == 0).await;

        sim.set_fault(1, Fault::None).unwrap();
        let mut fresh = client(&sim, 1).await;
        assert_eq!(read_holding(&mut fresh, 0, 1).await, Ok(vec![0]));
        assert_eq!(sim.accepted_connections(), 2);
        assert_eq!(sim.active_connections(), 1);
    }

    #[tokio::test]
    async fn drop_connections_closes_idle_clients_and_allows_reconnects() {
        let sim = sim([1]).await;
        let mut a = client(&sim, 1).await;
        let mut b = client(&sim, 1).await;
        assert_eq!(read_holding(&mut a, 0, 1).await, Ok(vec![0]));
        assert_eq!(read_holding(&mut b, 0, 1).await, Ok(vec![0]));
        eventually(|| sim.active_connections() == 2).await;

        sim.drop_connections();
        eventually(|| sim.active_connections() == 0).await;
        for ctx in [&mut a, &mut b] {
            let res = timeout(CALL, ctx.read_holding_registers(0, 1))
                .await
                .unwrap();
            assert!(res.is_err(), "dropped connection must fail: {res:?}");
        }
        let mut c = client(&sim, 1).await;
        assert_eq!(read_holding(&mut c, 0, 1).await, Ok(vec![0]));
        assert_eq!(sim.accepted_connections(), 3);
    }

    /// Poll `f` every 10 ms until it returns true, for at most 5 s.
    async fn eventually(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not reached in 5 s");
            sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn counter_script_advances_and_stops_when_removed() {
        let sim = sim([1]).await;
        sim.set_holding(1, 0, &[65_534]).unwrap();
        let id = sim
            .add_script(
                1,
                Table::HoldingRegisters,
                0,
                Script::Counter { step: 1 },
                Duration::from_millis(10),
            )
            .unwrap();
        // Starts from the current value and wraps at 65536.
        eventually(|| sim.holding(1, 0, 1).unwrap()[0] == 3).await;
        let mut ctx = client(&sim, 1).await;
        let seen = read_holding(&mut ctx, 0, 1).await.unwrap()[0];
        assert!((3..1000).contains(&seen), "seen {seen}");

        assert!(sim.remove_script(id));
        assert!(!sim.remove_script(id));
        sleep(Duration::from_millis(30)).await;
        let frozen = sim.holding(1, 0, 1).unwrap();
        sleep(Duration::from_millis(60)).await;
        assert_eq!(sim.holding(1, 0, 1).unwrap(), frozen);
    }

    #[tokio::test]
    async fn ramp_sine_fixed_and_coil_scripts() {
        let sim = sim([1]).await;
        let tick = Duration::from_millis(5);
        let ramp = Script::Ramp {
            from: 10.0,
            to: 13.0,
            step: 1.0,
            encoding: Encoding::U16,
        };
        sim.add_script(1, Table::InputRegisters, 0, ramp, tick)
            .unwrap();
        let sine = Script::Sine {
            amplitude: 10.0,
            offset: 50.0,
            period: Duration::from_millis(200),
            encoding: Encoding::F32(WordOrder::WordSwapped),
        };
        sim.add_script(1, Table::HoldingRegisters, 100, sine, tick)
            .unwrap();
        sim.add_script(1, Table::HoldingRegisters, 5, Script::Fixed(42), tick)
            .unwrap();
        sim.add_script(1, Table::Coils, 0, Script::Counter { step: 1 }, tick)
            .unwrap();

        // The ramp visits every value of 10..=13 and nothing else.
        let mut ramp_seen = std::collections::BTreeSet::new();
        eventually(|| {
            ramp_seen.insert(sim.input(1, 0, 1).unwrap()[0]);
            ramp_seen.len() >= 4
        })
        .await;
        assert_eq!(
            ramp_seen.into_iter().collect::<Vec<_>>(),
            vec![10, 11, 12, 13]
        );

        // The sine stays within offset ± amplitude and takes several values.
        let mut sine_seen = Vec::new();
        eventually(|| {
            let words = sim.holding(1, 100, 2).unwrap();
            let v = decode_f32([words[0], words[1]], WordOrder::WordSwapped);
            sine_seen.push(v);
            sine_seen.iter().any(|&v| v > 55.0) && sine_seen.iter().any(|&v| v < 45.0)
        })
        .await;
        assert!(
            sine_seen.iter().all(|v| (39.99..=60.01).contains(v)),
            "{sine_seen:?}"
        );

        // Fixed overrides client writes on the next tick.
        let mut ctx = client(&sim, 1).await;
        ctx.write_single_register(5, 1).await.unwrap().unwrap();
        eventually(|| sim.holding(1, 5, 1).unwrap() == vec![42]).await;

        // A counter on a coil toggles it.
        let mut states = std::collections::BTreeSet::new();
        eventually(|| {
            states.insert(sim.coil(1, 0).unwrap());
            states.len() == 2
        })
        .await;
    }

    #[tokio::test]
    async fn invalid_scripts_are_rejected() {
        let sim = sim([1]).await;
        let tick = Duration::from_millis(10);
        let sine = Script::sine_f32(1.0, 0.0, Duration::from_secs(1));
        assert!(matches!(
            sim.add_script(1, Table::HoldingRegisters, 9_999, sine.clone(), tick),
            Err(SimError::OutOfRange { .. })
        ));
        assert!(matches!(
            sim.add_script(1, Table::Coils, 0, sine.clone(), tick),
            Err(SimError::InvalidScript(_))
        ));
        assert!(matches!(
            sim.add_script(4, Table::HoldingRegisters, 0, sine.clone(), tick),
            Err(SimError::UnknownUnit(4))
        ));
        assert!(matches!(
            sim.add_script(1, Table::HoldingRegisters, 0, sine, Duration::ZERO),
            Err(SimError::InvalidScript(_))
        ));
        let backwards = Script::Ramp {
            from: 0.0,
            to: 10.0,
            step: -1.0,
            encoding: Encoding::U16,
        };
        assert!(matches!(
            sim.add_script(1, Table::HoldingRegisters, 0, backwards, tick),
            Err(SimError::InvalidScript(_))
        ));
    }

    #[test]
    fn handle_is_shareable_across_tasks() {
        fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
        assert_shareable::<SimHandle>();
        assert_shareable::<Simulator>();
    }

    #[test]
    fn encodings_round_trip() {
        assert_eq!(encode_f32(1.0, WordOrder::BigEndian), [0x3F80, 0x0000]);
        assert_eq!(encode_f32(1.0, WordOrder::WordSwapped), [0x0000, 0x3F80]);
        assert_eq!(decode_f32([0x0000, 0x3F80], WordOrder::WordSwapped), 1.0);
        assert_eq!(
            Encoding::F32(WordOrder::BigEndian).encode(1.0),
            vec![0x3F80, 0]
        );
        assert_eq!(Encoding::I16.encode(-2.0), vec![0xFFFE]);
        assert_eq!(Encoding::U16.encode(70_000.0), vec![0xFFFF]);
        assert_eq!(Encoding::U16.encode(-5.0), vec![0]);
        assert_eq!(
            Encoding::U32(WordOrder::WordSwapped).encode(65_537.0),
            vec![1, 1]
        );
        assert_eq!(
            Encoding::U32(WordOrder::BigEndian).encode(65_538.0),
            vec![1, 2]
        );
        assert_eq!(
            Encoding::F64(WordOrder::BigEndian).encode(1.0),
            vec![0x3FF0, 0, 0, 0]
        );
        assert_eq!(
            Encoding::F64(WordOrder::WordSwapped).encode(1.0),
            vec![0, 0, 0, 0x3FF0]
        );
        for enc in [
            Encoding::U16,
            Encoding::I16,
            Encoding::U32(WordOrder::BigEndian),
            Encoding::I32(WordOrder::WordSwapped),
            Encoding::F32(WordOrder::WordSwapped),
            Encoding::F64(WordOrder::WordSwapped),
        ] {
            let unsigned = matches!(enc, Encoding::U16 | Encoding::U32(_));
            let expected = if unsigned { 0.0 } else { -3.0 };
            assert_eq!(enc.decode(&enc.encode(-3.0)), Some(expected), "{enc:?}");
            assert_eq!(enc.decode(&enc.encode(1234.0)), Some(1234.0), "{enc:?}");
            assert_eq!(enc.decode(&[0; 3]), None);
        }
    }

    #[tokio::test]
    async fn set_value_writes_encoded_registers() {
        let sim = sim([1]).await;
        sim.set_value(
            1,
            Table::HoldingRegisters,
            0,
            21.5,
            Encoding::F32(WordOrder::BigEndian),
        )
        .unwrap();
        let words = sim.holding(1, 0, 2).unwrap();
        assert_eq!(decode_f32([words[0], words[1]], WordOrder::BigEndian), 21.5);
        assert!(
            sim.set_value(1, Table::Coils, 0, 1.0, Encoding::U16)
                .is_err()
        );
    }

    #[tokio::test]
    async fn shutdown_stops_listening() {
        let sim = sim([1]).await;
        let addr = sim.local_addr();
        let mut ctx = client(&sim, 1).await;
        assert_eq!(read_holding(&mut ctx, 0, 1).await, Ok(vec![0]));
        sim.shutdown();
        sim.shutdown();
        // Give the aborted tasks a moment to be dropped, then connections are refused and
        // the open connection is closed.
        eventually(|| std::net::TcpStream::connect(addr).is_err()).await;
        let res = timeout(CALL, ctx.read_holding_registers(0, 1))
            .await
            .unwrap();
        assert!(res.is_err(), "closed connection must fail: {res:?}");
    }

    /// 20 units x 500 registers (4 reads of 125 each) per cycle, as the agent load test does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_twenty_units_of_five_hundred_registers_quickly() {
        let sim = SimHandle::start(
            "127.0.0.1:0".parse().unwrap(),
            SimConfig::with_units(1..=20).sizes(BankSizes::uniform(500)),
        )
        .await
        .unwrap();
        let mut clients = Vec::new();
        for unit in 1..=20 {
            clients.push(client(&sim, unit).await);
        }
        let cycles = 10;
        let started = Instant::now();
        for _ in 0..cycles {
            for ctx in &mut clients {
                for block in 0..4 {
                    let words = read_holding(ctx, block * 125, 125).await.unwrap();
                    assert_eq!(words.len(), 125);
                }
            }
        }
        let per_cycle = started.elapsed() / cycles;
        assert_eq!(sim.total_requests(), u64::from(cycles) * 80);
        // Sequential requests on loopback, debug build, shared machine: still far below the
        // 100 ms poll interval.
        assert!(
            per_cycle < Duration::from_millis(100),
            "{per_cycle:?} per cycle"
        );
    }
}
