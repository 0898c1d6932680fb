//! Verified writes: a value for a writable tag is encoded with the tag's codec, written with
//! the function the table calls for, and read back.
//!
//! # Rules
//!
//! - Only tags with access `write` or `read_write` in the coil or holding-register table are
//!   written; anything else is [`WriteError::NotWritable`].
//! - **Coils**: function 5 (write single coil); a device that answers "illegal function"
//!   (exception 1) is asked again with function 15 (write multiple coils, one coil).
//! - **Holding registers**: a one-register value with function 6 (write single register,
//!   falling back to 16 on exception 1), a wider value (32/64-bit, strings) with function 16
//!   in one request, so the PLC never sees half a value.
//! - **A bool in bit `n` of a holding register** is a read-modify-write: the register is read
//!   (function 3), bit `n` set or cleared, and the whole register written back (function 6).
//!   This is **not atomic**: if the PLC itself changes another bit of that register between
//!   our read and our write, its change is overwritten. Use a register of its own (or a coil)
//!   for bits the PLC writes too.
//! - **Verification**: a `read_write` tag is read back after the write (function 1 for a
//!   coil, 3 for registers) and compared with what was written — the exact registers, or, for
//!   a register bit, only that bit. Equal: [`WriteOutcome::Verified`]; different:
//!   [`WriteError::Mismatch`]. A `write` (write-only) tag is not read back:
//!   [`WriteOutcome::Written`] once the device acknowledged the write (with the echo checked).
//! - Writes run on the link task, one request at a time, interleaved with polling, each
//!   request under the device timeout. A write to a unit that is backing off fails at once
//!   with [`WriteError::UnitBackingOff`]; a write while the link is down with
//!   [`WriteError::Disconnected`]. A write that times out backs the unit off like a read.
//!
//! Metric: [`WRITES_TOTAL`], labels `link`, `unit`, `result` ([`WriteOutcome::label`] or
//! [`WriteError::label`]).

use std::borrow::Cow;
use std::time::Duration;

use edgesync_protocol::{DeviceId, PropertyId, Value};
use metrics::Counter;
use tokio::sync::{mpsc, oneshot};
use tokio_modbus::{Request, Response};

use super::codec::{self, EncodeError};
use super::metrics::{ErrorKind, UnitMetrics};
use super::transport::{Conn, Reply};
use crate::model::{Access, DataType, Table, TagSpec};

/// Counter of writes, labels `link`, `unit`, `result`.
pub const WRITES_TOTAL: &str = "edgesync_modbus_writes_total";

/// Describes the write metric to the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        WRITES_TOTAL,
        "Modbus writes by result (verified, written, mismatch, exception, timeout, ...)"
    );
}

/// A successful write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteOutcome {
    /// Written and read back equal (a `read_write` tag).
    Verified,
    /// Written and acknowledged by the device, not read back (a write-only tag).
    Written,
}

impl WriteOutcome {
    /// The `result` label of [`WRITES_TOTAL`].
    pub fn label(&self) -> &'static str {
        match self {
            WriteOutcome::Verified => "verified",
            WriteOutcome::Written => "written",
        }
    }
}

/// Why a write failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// No device with this id is on the link.
    #[error("device {0} is not on this link")]
    UnknownDevice(DeviceId),
    /// The device has no tag with this property.
    #[error("device {device} has no tag {property}")]
    UnknownTag {
        /// The device.
        device: DeviceId,
        /// The property asked for.
        property: PropertyId,
    },
    /// The tag may not be written.
    #[error("tag {property} is not writable: {reason}")]
    NotWritable {
        /// The property.
        property: PropertyId,
        /// Why.
        reason: &'static str,
    },
    /// The value does not fit the tag.
    #[error("cannot encode the value: {0}")]
    Encode(#[from] EncodeError),
    /// The unit timed out recently and is backing off.
    #[error("unit is backing off after failures; next attempt in {retry_in:?}")]
    UnitBackingOff {
        /// Time until the unit is polled again.
        retry_in: Duration,
    },
    /// The link is down (reconnecting).
    #[error("the link is disconnected")]
    Disconnected,
    /// The device did not answer within the timeout.
    #[error("the device did not answer in time")]
    Timeout,
    /// The device answered with an exception.
    #[error("the device answered with exception {0:#04x}")]
    Exception(u8),
    /// The device's answer was malformed or did not echo the write.
    #[error("bad response: {0}")]
    BadResponse(String),
    /// The value read back differs from the value written (registers; coils as 0 or 1).
    #[error("read back {read:04x?} after writing {wrote:04x?}")]
    Mismatch {
        /// The registers (or coil) written.
        wrote: Vec<u16>,
        /// The registers (or coil) read back.
        read: Vec<u16>,
    },
    /// The link task has stopped.
    #[error("the link task has stopped")]
    LinkClosed,
}

impl WriteError {
    /// The `result` label of [`WRITES_TOTAL`].
    pub fn label(&self) -> &'static str {
        match self {
            WriteError::UnknownDevice(_) | WriteError::UnknownTag { .. } => "unknown_tag",
            WriteError::NotWritable { .. } => "not_writable",
            WriteError::Encode(_) => "encode",
            WriteError::UnitBackingOff { .. } => "backoff",
            WriteError::Disconnected | WriteError::LinkClosed => "disconnected",
            WriteError::Timeout => "timeout",
            WriteError::Exception(_) => "exception",
            WriteError::BadResponse(_) => "bad_response",
            WriteError::Mismatch { .. } => "mismatch",
        }
    }
}

/// Every `result` label a unit registers.
const LABELS: [&str; 11] = [
    "verified",
    "written",
    "unknown_tag",
    "not_writable",
    "encode",
    "backoff",
    "disconnected",
    "timeout",
    "exception",
    "bad_response",
    "mismatch",
];

/// Write counters of one unit, registered with the recorder current at creation.
#[derive(Debug, Clone)]
pub(crate) struct WriteMetrics {
    counters: Vec<(&'static str, Counter)>,
}

impl WriteMetrics {
    pub(crate) fn new(link: &str, unit: &str) -> Self {
        let counters = LABELS
            .iter()
            .map(|&result| {
                let counter = metrics::counter!(
                    WRITES_TOTAL,
                    "link" => link.to_owned(),
                    "unit" => unit.to_owned(),
                    "result" => result
                );
                (result, counter)
            })
            .collect();
        WriteMetrics { counters }
    }

    pub(crate) fn record(&self, result: &Result<WriteOutcome, WriteError>) {
        let label = match result {
            Ok(o) => o.label(),
            Err(e) => e.label(),
        };
        if let Some((_, c)) = self.counters.iter().find(|(l, _)| *l == label) {
            c.increment(1);
        }
    }
}

/// A write request sent to a link task.
#[derive(Debug)]
pub(crate) struct WriteCommand {
    pub(crate) device: DeviceId,
    pub(crate) property: PropertyId,
    pub(crate) value: Value,
    pub(crate) reply: oneshot::Sender<Result<WriteOutcome, WriteError>>,
}

/// Writes through a running link task (cheap to clone). Writes queue behind the request in
/// flight and are served between poll cycles.
#[derive(Debug, Clone)]
pub struct LinkHandle {
    key: String,
    tx: mpsc::Sender<WriteCommand>,
}

impl LinkHandle {
    pub(crate) fn new(key: String, tx: mpsc::Sender<WriteCommand>) -> Self {
        LinkHandle { key, tx }
    }

    /// The key of the link ([`crate::model::LinkSpec::key`]).
    pub fn link(&self) -> &str {
        &self.key
    }

    /// Writes `value` to `property` of `device` and verifies it (see the module docs).
    /// Waits while the write queue is full.
    pub async fn write(
        &self,
        device: &DeviceId,
        property: &PropertyId,
        value: Value,
    ) -> Result<WriteOutcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        let cmd = WriteCommand {
            device: device.clone(),
            property: property.clone(),
            value,
            reply,
        };
        self.tx
            .send(cmd)
            .await
            .map_err(|_| WriteError::LinkClosed)?;
        rx.await.map_err(|_| WriteError::LinkClosed)?
    }
}

/// What a write does on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WriteOp {
    /// Set a coil.
    Coil(bool),
    /// Write these holding registers.
    Registers(Vec<u16>),
    /// Read-modify-write one holding register: `new = (old & keep) | set`.
    RegisterBit {
        /// Bits kept from the current value.
        keep: u16,
        /// Bits set.
        set: u16,
    },
}

/// Checks that `tag` may be written and encodes `value` for it.
pub(crate) fn prepare(tag: &TagSpec, value: &Value) -> Result<WriteOp, WriteError> {
    let refuse = |reason| WriteError::NotWritable {
        property: tag.property.clone(),
        reason,
    };
    if tag.access == Access::Read {
        return Err(refuse("the tag is read-only"));
    }
    match tag.table {
        Table::DiscreteInput => Err(refuse("discrete inputs cannot be written")),
        Table::InputRegister => Err(refuse("input registers cannot be written")),
        Table::Coil => Ok(WriteOp::Coil(codec::encode_bit(tag, value)?)),
        Table::HoldingRegister => {
            if tag.data_type == DataType::Bool && tag.bit.is_some() {
                let (and, or) = codec::encode_bit_mask(tag, value)?;
                Ok(WriteOp::RegisterBit {
                    keep: and,
                    set: or & !and,
                })
            } else {
                Ok(WriteOp::Registers(codec::encode(tag, value)?))
            }
        }
    }
}

/// How the connection fared during a write, for the link.
#[derive(Debug)]
pub(crate) enum ConnFate {
    /// Fine.
    Ok,
    /// Re-establish it quietly.
    Reset,
    /// It broke.
    Down(String),
}

/// The unit, timeout and metrics a write runs with.
pub(crate) struct Target<'a> {
    pub(crate) unit: u8,
    pub(crate) timeout: Duration,
    pub(crate) metrics: &'a UnitMetrics,
}

/// One exchange; failures become the write error and the connection's fate.
async fn exchange(
    conn: &mut Conn,
    target: &Target<'_>,
    req: Request<'static>,
    fate: &mut ConnFate,
) -> Result<Response, WriteError> {
    target.metrics.request();
    match conn.call(target.unit, req, target.timeout).await {
        Reply::Response(r, took) => {
            target.metrics.response(took);
            Ok(r)
        }
        Reply::Exception(code, took) => {
            target.metrics.response(took);
            target.metrics.error(ErrorKind::Exception);
            Err(WriteError::Exception(code))
        }
        Reply::Timeout => {
            target.metrics.error(ErrorKind::Timeout);
            if conn.timeout_resets() {
                *fate = ConnFate::Reset;
            }
            Err(WriteError::Timeout)
        }
        Reply::Transport(e) => {
            target.metrics.error(ErrorKind::Transport);
            *fate = ConnFate::Down(e);
            Err(WriteError::Disconnected)
        }
        Reply::BadResponse { error, took, reset } => {
            target.metrics.response(took);
            target.metrics.error(ErrorKind::BadResponse);
            if reset {
                *fate = ConnFate::Reset;
            }
            Err(WriteError::BadResponse(error))
        }
    }
}

fn bad(what: &str) -> WriteError {
    WriteError::BadResponse(format!("the device did not echo the {what}"))
}

async fn read_registers(
    conn: &mut Conn,
    target: &Target<'_>,
    address: u16,
    count: u16,
    fate: &mut ConnFate,
) -> Result<Vec<u16>, WriteError> {
    match exchange(
        conn,
        target,
        Request::ReadHoldingRegisters(address, count),
        fate,
    )
    .await?
    {
        Response::ReadHoldingRegisters(words) if words.len() == usize::from(count) => Ok(words),
        _ => Err(WriteError::BadResponse(
            "the read-back does not match the request".to_owned(),
        )),
    }
}

async fn write_registers(
    conn: &mut Conn,
    target: &Target<'_>,
    address: u16,
    words: &[u16],
    fate: &mut ConnFate,
) -> Result<(), WriteError> {
    let count = u16::try_from(words.len()).map_err(|_| bad("register count"))?;
    if let [word] = words {
        let single = Request::WriteSingleRegister(address, *word);
        match exchange(conn, target, single, fate).await {
            Ok(Response::WriteSingleRegister(a, v)) if a == address && v == *word => {
                return Ok(());
            }
            Ok(_) => return Err(bad("register write")),
            // Illegal function: the device only knows function 16.
            Err(WriteError::Exception(1)) => {}
            Err(e) => return Err(e),
        }
    }
    let multi = Request::WriteMultipleRegisters(address, Cow::Owned(words.to_vec()));
    match exchange(conn, target, multi, fate).await? {
        Response::WriteMultipleRegisters(a, n) if a == address && n == count => Ok(()),
        _ => Err(bad("register write")),
    }
}

async fn write_coil(
    conn: &mut Conn,
    target: &Target<'_>,
    address: u16,
    on: bool,
    fate: &mut ConnFate,
) -> Result<(), WriteError> {
    match exchange(conn, target, Request::WriteSingleCoil(address, on), fate).await {
        Ok(Response::WriteSingleCoil(a, v)) if a == address && v == on => return Ok(()),
        Ok(_) => return Err(bad("coil write")),
        // Illegal function: the device only knows function 15.
        Err(WriteError::Exception(1)) => {}
        Err(e) => return Err(e),
    }
    let multi = Request::WriteMultipleCoils(address, Cow::Owned(vec![on]));
    match exchange(conn, target, multi, fate).await? {
        Response::WriteMultipleCoils(a, 1) if a == address => Ok(()),
        _ => Err(bad("coil write")),
    }
}

/// Runs `op` on `tag` of `target`'s unit; returns the result and how the connection fared.
pub(crate) async fn execute(
    conn: &mut Conn,
    target: &Target<'_>,
    tag: &TagSpec,
    op: WriteOp,
) -> (Result<WriteOutcome, WriteError>, ConnFate) {
    let mut fate = ConnFate::Ok;
    let result = run(conn, target, tag, op, &mut fate).await;
    (result, fate)
}

async fn run(
    conn: &mut Conn,
    target: &Target<'_>,
    tag: &TagSpec,
    op: WriteOp,
    fate: &mut ConnFate,
) -> Result<WriteOutcome, WriteError> {
    let verify = tag.access == Access::ReadWrite;
    let address = tag.address;
    match op {
        WriteOp::Coil(on) => {
            write_coil(conn, target, address, on, fate).await?;
            if !verify {
                return Ok(WriteOutcome::Written);
            }
            let read = match exchange(conn, target, Request::ReadCoils(address, 1), fate).await? {
                Response::ReadCoils(bits) => bits.first().copied().ok_or_else(|| bad("coil"))?,
                _ => return Err(bad("coil")),
            };
            if read == on {
                Ok(WriteOutcome::Verified)
            } else {
                Err(WriteError::Mismatch {
                    wrote: vec![u16::from(on)],
                    read: vec![u16::from(read)],
                })
            }
        }
        WriteOp::Registers(words) => {
            write_registers(conn, target, address, &words, fate).await?;
            if !verify {
                return Ok(WriteOutcome::Written);
            }
            let count = u16::try_from(words.len()).map_err(|_| bad("register count"))?;
            let read = read_registers(conn, target, address, count, fate).await?;
            if read == words {
                Ok(WriteOutcome::Verified)
            } else {
                Err(WriteError::Mismatch { wrote: words, read })
            }
        }
        WriteOp::RegisterBit { keep, set } => {
            let current = read_registers(conn, target, address, 1, fate).await?;
            let new = current.first().copied().unwrap_or(0) & keep | set;
            write_registers(conn, target, address, &[new], fate).await?;
            if !verify {
                return Ok(WriteOutcome::Written);
            }
            let read = read_registers(conn, target, address, 1, fate).await?;
            let mask = !keep;
            if read.first().is_some_and(|r| r & mask == new & mask) {
                Ok(WriteOutcome::Verified)
            } else {
                Err(WriteError::Mismatch {
                    wrote: vec![new],
                    read,
                })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::{ByteOrder, ReportPolicy};

    fn tag(table: Table, data_type: DataType, bit: Option<u8>, access: Access) -> TagSpec {
        TagSpec {
            property: PropertyId::new("p").unwrap(),
            table,
            address: 7,
            data_type,
            bit,
            byte_order: ByteOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            access,
            poll_interval: Duration::from_secs(1),
            report: ReportPolicy::default(),
        }
    }

    #[test]
    fn prepare_picks_the_operation_of_each_table() {
        let rw = Access::ReadWrite;
        assert_eq!(
            prepare(
                &tag(Table::Coil, DataType::Bool, None, rw),
                &Value::Bool(true)
            ),
            Ok(WriteOp::Coil(true))
        );
        assert_eq!(
            prepare(
                &tag(Table::HoldingRegister, DataType::Bool, Some(3), rw),
                &Value::Bool(true)
            ),
            Ok(WriteOp::RegisterBit {
                keep: !0b1000,
                set: 0b1000
            })
        );
        assert_eq!(
            prepare(
                &tag(Table::HoldingRegister, DataType::Bool, Some(3), rw),
                &Value::Bool(false)
            ),
            Ok(WriteOp::RegisterBit {
                keep: !0b1000,
                set: 0
            })
        );
        assert_eq!(
            prepare(
                &tag(Table::HoldingRegister, DataType::UInt32, None, rw),
                &Value::UInt(0x0102_0304)
            ),
            Ok(WriteOp::Registers(vec![0x0102, 0x0304]))
        );
    }

    #[test]
    fn prepare_refuses_what_cannot_be_written() {
        let refused = |t: TagSpec| {
            matches!(
                prepare(&t, &Value::Int(1)),
                Err(WriteError::NotWritable { .. })
            )
        };
        assert!(refused(tag(
            Table::HoldingRegister,
            DataType::Int16,
            None,
            Access::Read
        )));
        assert!(refused(tag(
            Table::InputRegister,
            DataType::Int16,
            None,
            Access::ReadWrite
        )));
        assert!(refused(tag(
            Table::DiscreteInput,
            DataType::Bool,
            None,
            Access::Write
        )));
        assert!(matches!(
            prepare(
                &tag(Table::HoldingRegister, DataType::Int16, None, Access::Write),
                &Value::Int(40_000)
            ),
            Err(WriteError::Encode(_))
        ));
    }
}
