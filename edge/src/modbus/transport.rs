//! The transports of a Modbus link: Modbus TCP, Modbus RTU over a serial port, and RTU
//! frames over TCP, behind one [`Conn`] that sends one request and waits for its answer.
//!
//! # RTU on a shared bus
//!
//! RTU frames carry no transaction id, so an answer that arrives after its request timed out
//! could be taken for the answer to the next request. Instead of resetting the link (the bus
//! is shared by every unit on it, and reopening it would punish the healthy ones), an RTU
//! connection:
//!
//! - keeps the configured inter-frame delay of silence after every exchange (answered, failed
//!   or timed out) before it sends the next request;
//! - discards every byte already received when it starts writing a request ([`Flushing`]),
//!   so a late answer that arrived in the meantime is thrown away (tokio-modbus clears its own
//!   frame buffer at the start of each call; this also empties what the kernel holds);
//! - when an answer still comes from the wrong unit or for the wrong function (a late answer
//!   that arrived after the next request was sent), sends the request once more after the
//!   delay, and only then reports a bad response — still without resetting the link.
//!
//! A late answer from the *same* unit to the *same* request is indistinguishable from the
//! real one; it only happens when a unit answers later than its backoff, and carries the
//! registers that were asked for.
//!
//! Modbus TCP matches transaction ids; tokio-modbus reports a mismatch as an error instead
//! of skipping the stale frame, so a TCP connection is re-established after a timeout
//! ([`Conn::timeout_resets`]).

use std::io;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_modbus::client::{Client as _, Context};
use tokio_modbus::slave::{Slave, SlaveContext as _};
use tokio_modbus::{Request, Response};

use crate::model::{LinkSpec, Parity};

/// Counter of connections established (TCP connects, serial port opens), label `link`. It
/// counting more than once per outage shows a link being reset.
pub const CONNECTS_TOTAL: &str = "edgesync_modbus_connects_total";

/// Describes the transport metric to the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        CONNECTS_TOTAL,
        "Modbus connections established (TCP connects, serial port opens)"
    );
}

/// Silence kept between exchanges of RTU frames over TCP (the converter times the serial
/// side itself; this only gives a late answer the chance to arrive and be discarded).
pub const RTU_OVER_TCP_FRAME_DELAY: Duration = Duration::from_millis(2);

/// Most bytes discarded before one request (a bus that never stops talking cannot hold the
/// link in the discard loop).
const MAX_DISCARD: usize = 4096;

/// A stream that discards whatever has been received but not read each time it starts
/// writing: RTU has no transaction ids, so anything pending before a request is stale.
#[derive(Debug)]
pub struct Flushing<T> {
    inner: T,
}

impl<T> Flushing<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Flushing { inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Flushing<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Flushing<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Discard what is pending. `Pending` registers this task for readability, which it
        // wants anyway: the answer comes next.
        let mut scratch = [0u8; 256];
        let mut discarded = 0usize;
        while discarded < MAX_DISCARD {
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => discarded += rb.filled().len(),
                // End of stream: the read that follows the request reports it.
                Poll::Ready(Ok(())) => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if discarded > 0 {
            tracing::debug!(
                bytes = discarded,
                "discarded stale bytes before an rtu request"
            );
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The result of one exchange.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A normal response, and the round-trip time.
    Response(Response, Duration),
    /// An exception response with its code, and the round-trip time.
    Exception(u8, Duration),
    /// No answer within the timeout.
    Timeout,
    /// The connection failed.
    Transport(String),
    /// A malformed or mismatched answer; `reset` says whether the connection must be
    /// re-established before it can be used again.
    BadResponse {
        /// What was wrong.
        error: String,
        /// Time until the bad answer.
        took: Duration,
        /// Re-establish the connection.
        reset: bool,
    },
}

/// An open Modbus connection of any transport.
pub(crate) struct Conn {
    ctx: Context,
    /// RTU framing: the silence kept between exchanges. `None` for Modbus TCP.
    frame_delay: Option<Duration>,
    /// No request is sent before this instant (RTU).
    quiet_until: Instant,
}

impl Conn {
    /// Whether a timeout leaves the connection unusable (Modbus TCP: a late answer would
    /// carry a stale transaction id), so it must be re-established.
    pub(crate) fn timeout_resets(&self) -> bool {
        self.frame_delay.is_none()
    }

    /// Whether the connection frames requests as RTU.
    pub(crate) fn is_rtu(&self) -> bool {
        self.frame_delay.is_some()
    }

    /// Sends `req` to `unit` and waits at most `timeout` for the answer (see the module docs
    /// for the RTU rules).
    pub(crate) async fn call(
        &mut self,
        unit: u8,
        req: Request<'static>,
        timeout: Duration,
    ) -> Reply {
        let attempts = if self.frame_delay.is_some() { 2 } else { 1 };
        let mut last = Reply::Timeout;
        for attempt in 1..=attempts {
            if self.frame_delay.is_some() {
                tokio::time::sleep_until(self.quiet_until).await;
            }
            self.ctx.set_slave(Slave(unit));
            let started = Instant::now();
            let result = tokio::time::timeout(timeout, self.ctx.call(req.clone())).await;
            let took = started.elapsed();
            if let Some(delay) = self.frame_delay {
                self.quiet_until = Instant::now() + delay;
            }
            last = match result {
                Err(_) => Reply::Timeout,
                // The codec rejected the bytes: the peer talks, but not valid Modbus. The
                // framed stream ends after a decode error, so the connection is renewed.
                Ok(Err(tokio_modbus::Error::Transport(e)))
                    if e.kind() == io::ErrorKind::InvalidData =>
                {
                    Reply::BadResponse {
                        error: e.to_string(),
                        took,
                        reset: true,
                    }
                }
                Ok(Err(tokio_modbus::Error::Transport(e))) => Reply::Transport(e.to_string()),
                Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                    let rtu = self.frame_delay.is_some();
                    if rtu && attempt < attempts {
                        tracing::debug!(unit, error = %e, "stale rtu answer; asking again");
                        continue;
                    }
                    Reply::BadResponse {
                        error: e.to_string(),
                        took,
                        reset: !rtu,
                    }
                }
                Ok(Ok(Err(exception))) => Reply::Exception(u8::from(exception), took),
                Ok(Ok(Ok(response))) => Reply::Response(response, took),
            };
            break;
        }
        last
    }
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Connecting or opening failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The TCP connect did not finish in time.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// The serial settings cannot be applied.
    #[error("unsupported serial setting: {0}")]
    Setting(String),
}

async fn connect_tcp(
    endpoint: &str,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, OpenError> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(endpoint))
        .await
        .map_err(|_| OpenError::Timeout(timeout))??;
    // Small request/response frames: do not wait for Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens `link`: connects to a TCP endpoint (within `connect_timeout`) or opens and
/// configures a serial port.
pub(crate) async fn open(link: &LinkSpec, connect_timeout: Duration) -> Result<Conn, OpenError> {
    let now = Instant::now();
    match link {
        LinkSpec::Tcp { endpoint } => {
            let stream = connect_tcp(endpoint, connect_timeout).await?;
            Ok(Conn {
                ctx: tokio_modbus::client::tcp::attach_slave(stream, Slave::tcp_device()),
                frame_delay: None,
                quiet_until: now,
            })
        }
        LinkSpec::RtuOverTcp { endpoint } => {
            let stream = connect_tcp(endpoint, connect_timeout).await?;
            Ok(Conn {
                ctx: tokio_modbus::client::rtu::attach_slave(
                    Flushing::new(stream),
                    Slave::broadcast(),
                ),
                frame_delay: Some(RTU_OVER_TCP_FRAME_DELAY),
                quiet_until: now,
            })
        }
        LinkSpec::Rtu {
            path,
            baud,
            parity,
            data_bits,
            stop_bits,
            inter_frame_delay,
        } => {
            let stream = open_serial(path, *baud, *parity, *data_bits, *stop_bits)?;
            Ok(Conn {
                ctx: tokio_modbus::client::rtu::attach_slave(
                    Flushing::new(stream),
                    Slave::broadcast(),
                ),
                frame_delay: Some(*inter_frame_delay),
                // The line may carry the tail of a frame from before: start with silence.
                quiet_until: now + *inter_frame_delay,
            })
        }
    }
}

/// Opens a serial port in non-blocking mode with the given line settings (8 or 7 data bits,
/// 1 or 2 stop bits, no flow control).
fn open_serial(
    path: &str,
    baud: u32,
    parity: Parity,
    data_bits: u8,
    stop_bits: u8,
) -> Result<tokio_serial::SerialStream, OpenError> {
    let data_bits = match data_bits {
        7 => tokio_serial::DataBits::Seven,
        8 => tokio_serial::DataBits::Eight,
        n => return Err(OpenError::Setting(format!("{n} data bits"))),
    };
    let stop_bits = match stop_bits {
        1 => tokio_serial::StopBits::One,
        2 => tokio_serial::StopBits::Two,
        n => return Err(OpenError::Setting(format!("{n} stop bits"))),
    };
    let parity = match parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let builder = tokio_serial::new(path, baud)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .parity(parity)
        .flow_control(tokio_serial::FlowControl::None);
    tokio_serial::SerialStream::open(&builder).map_err(|e| OpenError::Io(io::Error::from(e)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{AgentConfig, ConfigErrors, parse};
    use crate::model::default_inter_frame_delay;

    const BASE: &str = r#"[agent]
data_dir = "data"
[hub]
address = "hub.local:7443"
[identity]
trust_domain = "example.org"
cert = "c.pem"
key = "k.pem"
bundle = "b.pem"
"#;

    fn device(id: &str, link_lines: &str) -> String {
        format!(
            "[[devices]]\nid = \"{id}\"\n{link_lines}\n[[devices.tags]]\nname = \"t\"\ntable = \"holding_register\"\naddress = 0\ntype = \"uint16\"\n"
        )
    }

    fn parse_devices(devices: &[String]) -> Result<AgentConfig, ConfigErrors> {
        let text = format!("{BASE}{}", devices.concat());
        parse("agent.toml", &text, Path::new("/etc/edgesync"))
    }

    fn messages(r: Result<AgentConfig, ConfigErrors>) -> Vec<String> {
        match r {
            Ok(_) => panic!("expected errors"),
            Err(e) => e
                .errors
                .into_iter()
                .map(|e| format!("{:?}: {}", e.line, e.message))
                .collect(),
        }
    }

    #[test]
    fn inter_frame_delay_defaults_to_three_and_a_half_characters() {
        // 19200 8E1: 11 bits per character, 3.5 characters = 2.005 ms.
        let d = default_inter_frame_delay(19_200, Parity::Even, 8, 1);
        assert_eq!(d.as_micros(), 2005);
        // 9600 8N1: 10 bits, 3.646 ms.
        let d = default_inter_frame_delay(9_600, Parity::None, 8, 1);
        assert_eq!(d.as_micros(), 3645);
        // Fast lines get the 2 ms floor.
        assert_eq!(
            default_inter_frame_delay(115_200, Parity::None, 8, 1),
            MIN_DELAY
        );
        assert_eq!(default_inter_frame_delay(0, Parity::None, 8, 1), MIN_DELAY);
    }

    const MIN_DELAY: Duration = crate::model::MIN_INTER_FRAME_DELAY;

    #[test]
    fn rtu_and_rtu_over_tcp_devices_parse() {
        let cfg = parse_devices(&[
            device(
                "a",
                "protocol = \"rtu\"\nserial_port = \"/dev/ttyUSB0\"\nbaud = 9600\nparity = \"none\"\ndata_bits = 8\nstop_bits = 2\nunit_id = 1",
            ),
            device("b", "protocol = \"rtu\"\nserial_port = \"/dev/ttyUSB0\"\nbaud = 9600\nparity = \"none\"\nstop_bits = 2\nunit_id = 2"),
            device("c", "protocol = \"rtu\"\nserial_port = \"/dev/ttyS1\"\ninter_frame_delay_ms = 7"),
            device("d", "protocol = \"rtu_over_tcp\"\nendpoint = \"10.0.0.9:4001\""),
        ])
        .unwrap();
        let links: Vec<&LinkSpec> = cfg.devices.iter().map(|d| &d.link).collect();
        assert_eq!(
            links[0],
            &LinkSpec::Rtu {
                path: "/dev/ttyUSB0".into(),
                baud: 9600,
                parity: Parity::None,
                data_bits: 8,
                stop_bits: 2,
                inter_frame_delay: default_inter_frame_delay(9600, Parity::None, 8, 2),
            }
        );
        // Same port, same settings: one physical link.
        assert_eq!(links[0], links[1]);
        assert_eq!(links[0].key(), "rtu:///dev/ttyUSB0");
        // Defaults: 19200 8E1; an explicit inter-frame delay.
        assert_eq!(
            links[2],
            &LinkSpec::Rtu {
                path: "/dev/ttyS1".into(),
                baud: 19_200,
                parity: Parity::Even,
                data_bits: 8,
                stop_bits: 1,
                inter_frame_delay: Duration::from_millis(7),
            }
        );
        assert_eq!(
            links[3],
            &LinkSpec::RtuOverTcp {
                endpoint: "10.0.0.9:4001".into()
            }
        );
        assert!(
            links[3].is_rtu()
                && !LinkSpec::Tcp {
                    endpoint: "x:1".into()
                }
                .is_rtu()
        );
    }

    #[test]
    fn conflicting_settings_on_one_serial_port_name_both_devices() {
        let errors = messages(parse_devices(&[
            device(
                "first",
                "protocol = \"rtu\"\nserial_port = \"/dev/ttyUSB0\"\nbaud = 9600",
            ),
            device(
                "second",
                "protocol = \"rtu\"\nserial_port = \"/dev/ttyUSB0\"\nbaud = 19200",
            ),
        ]));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let e = &errors[0];
        assert!(
            e.contains("\"second\"") && e.contains("\"first\"") && e.contains("on line 13"),
            "{e}"
        );
        // Reported on the second device's serial_port line.
        assert!(e.starts_with("Some(23)"), "{e}");
    }

    #[test]
    fn link_fields_are_checked() {
        let errors = messages(parse_devices(&[
            device("a", "protocol = \"rtu\""),
            device(
                "b",
                "protocol = \"rtu\"\nserial_port = \"/dev/x\"\nparity = \"mark\"\ndata_bits = 5\nstop_bits = 3\nbaud = 10",
            ),
            device("c", "protocol = \"tcp\"\nendpoint = \"h:1\"\nbaud = 9600"),
            device(
                "d",
                "protocol = \"rtu\"\nserial_port = \"/dev/y\"\nendpoint = \"h:1\"",
            ),
            device("e", "protocol = \"udp\"\nendpoint = \"h:1\""),
            device("f", "protocol = \"rtu_over_tcp\"\nendpoint = \"h:1\""),
            device("g", "protocol = \"tcp\"\nendpoint = \"h:1\""),
            device(
                "h",
                "protocol = \"rtu\"\nserial_port = \"/dev/z\"\nunit_id = 0",
            ),
        ]));
        let has = |needle: &str| {
            assert!(
                errors.iter().any(|e| e.contains(needle)),
                "no {needle:?} in {errors:#?}"
            )
        };
        has("device \"a\": missing required field \"serial_port\"");
        has("parity \"mark\" is not one of \"none\", \"even\", \"odd\"");
        has("data_bits is 5 but must be in 7..=8");
        has("stop_bits is 3 but must be in 1..=2");
        has("baud is 10 but must be in 300..=4000000");
        has("baud applies only to protocol \"rtu\", not \"tcp\"");
        has("endpoint applies to protocols \"tcp\" and \"rtu_over_tcp\"");
        has("protocol \"udp\" is not one of \"tcp\", \"rtu\", \"rtu_over_tcp\"");
        has("with the other framing");
        has("unit_id 0 is the broadcast address");
    }

    #[tokio::test]
    async fn a_missing_serial_port_is_an_open_error() {
        let link = LinkSpec::Rtu {
            path: "/dev/edgesync-no-such-port".into(),
            baud: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            inter_frame_delay: Duration::from_millis(4),
        };
        assert!(open(&link, Duration::from_secs(1)).await.is_err());
    }

    #[tokio::test]
    async fn flushing_discards_stale_bytes_before_writing() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut ours = Flushing::new(ours);
        theirs.write_all(b"stale").await.unwrap();
        tokio::task::yield_now().await;
        ours.write_all(b"req").await.unwrap();
        let mut req = [0u8; 3];
        theirs.read_exact(&mut req).await.unwrap();
        assert_eq!(&req, b"req");
        theirs.write_all(b"fresh").await.unwrap();
        let mut got = [0u8; 5];
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"fresh");
    }
}
