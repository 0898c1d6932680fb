//! Hostile and broken tunnel peers, for tests and benchmarks of the hub's bounds.
//!
//! - [`stalled_handshake`]: starts a QUIC handshake and never finishes it, optionally after
//!   answering the hub's Retry (so its address counts as validated), from a chosen local IP
//!   (any address of 127.0.0.0/8 works on Linux loopback, which lets a test tell a flood
//!   apart from a real agent by its source address).
//! - [`silent_peer`]: a peer with a valid edge certificate that says hello and then never
//!   reads (its stream receive window is a few bytes), so the hub's writes to it block.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use edgesync_edge::uplink::{UplinkConfig, client_config, svid_from_files};
use edgesync_protocol::frame::{self, Body, Frame, Hello};

use crate::harness::Pki;

/// A QUIC client config with the edge identity `spiffe://<td>/edge/<node>` minted from `pki`
/// (the agent's own `client_config`), for a hub at `tunnel` whose id is `spiffe://<td>/hub`.
pub fn peer_client(
    pki: &Pki,
    td: &str,
    tunnel: &str,
    node: &str,
    connect_timeout: Duration,
) -> anyhow::Result<quinn::ClientConfig> {
    let (cert, key) = pki.svid(&format!("spiffe://{td}/edge/{node}"), node)?;
    Ok(client_config(&UplinkConfig {
        hub_address: tunnel.to_owned(),
        hub_id: edgesync_protocol::spiffe_id::parse_id(&format!("spiffe://{td}/hub"))?,
        svid: svid_from_files(&cert, &key, &pki.bundle)?,
        svid_rotated: None,
        connect_timeout,
        keepalive: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(30),
        batch_max_records: 1,
        agent_version: node.to_owned(),
        boot_id: node.to_owned(),
    })?)
}

/// A length-prefixed records frame of empty samples (two bytes each on the wire), as many as
/// fit in `max_len` bytes: the cheapest way to make a receiver decode many records.
pub fn frame_of_empty_samples(max_len: usize) -> Vec<u8> {
    let mut records = vec![0x08, 0x01]; // first_seq = 1
    while records.len() + 2 + 16 <= max_len {
        records.extend_from_slice(&[0x12, 0x00]);
    }
    let mut body = vec![0x1a];
    let mut len = records.len() as u64;
    while len >= 0x80 {
        body.push((len as u8) | 0x80);
        len >>= 7;
    }
    body.push(len as u8);
    body.extend_from_slice(&records);
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// What the hub answered to a [`stalled_handshake`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubAnswer {
    /// Nothing within the wait.
    Nothing,
    /// A Retry (address validation): the hub keeps no state for the attempt.
    Retry,
    /// Handshake packets: the hub started TLS for the attempt (and holds a slot for it).
    Handshake,
    /// The attempt was refused (or the hub's answer could not be read as any of the above).
    Refused,
}

/// Sends a QUIC Initial to `hub` from `from` with `client` (a config with a valid edge identity
/// or none at all: the hub never gets to check it), answers a Retry if `answer_retry`, then
/// goes silent. Returns what the hub answered last.
pub async fn stalled_handshake(
    hub: SocketAddr,
    from: IpAddr,
    client: quinn::ClientConfig,
    answer_retry: bool,
    wait: Duration,
) -> anyhow::Result<HubAnswer> {
    let sock = tokio::net::UdpSocket::bind(SocketAddr::new(from, 0)).await?;
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let (_, mut conn) = ep.connect(Instant::now(), client, hub, "hub")?;
    let mut out = Vec::new();
    let send_all = |conn: &mut quinn_proto::Connection, out: &mut Vec<u8>| {
        let mut datagrams = Vec::new();
        while let Some(t) = conn.poll_transmit(Instant::now(), 1, out) {
            datagrams.push(out[..t.size].to_vec());
            out.clear();
        }
        datagrams
    };
    for d in send_all(&mut conn, &mut out) {
        sock.send_to(&d, hub).await?;
    }
    let mut answer = HubAnswer::Nothing;
    let mut retried = false;
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return Ok(answer),
            Ok(r) => r?,
        };
        let mut resp = Vec::new();
        match ep.handle(
            Instant::now(),
            hub,
            None,
            None,
            BytesMut::from(&buf[..n]),
            &mut resp,
        ) {
            Some(quinn_proto::DatagramEvent::ConnectionEvent(_, ev)) => {
                let was_retry = !retried && is_retry(&buf[..n]);
                conn.handle_event(ev);
                while conn.poll().is_some() {}
                if was_retry {
                    answer = HubAnswer::Retry;
                    retried = true;
                    if !answer_retry {
                        return Ok(answer);
                    }
                    // The Initial again, with the hub's token: the address is now validated.
                    for d in send_all(&mut conn, &mut out) {
                        sock.send_to(&d, hub).await?;
                    }
                } else if conn.is_closed() || conn.is_drained() {
                    return Ok(HubAnswer::Refused);
                } else {
                    // The hub's Initial/Handshake flight: stay silent from now on.
                    return Ok(HubAnswer::Handshake);
                }
            }
            _ => return Ok(HubAnswer::Refused),
        }
    }
}

/// Whether a datagram is a QUIC v1 Retry packet (long header, type 3).
fn is_retry(d: &[u8]) -> bool {
    d.first()
        .is_some_and(|b| b & 0x80 != 0 && (b >> 4) & 0x03 == 0x03)
}

/// A peer that authenticates with `client`, says hello and never reads again. The connection
/// stays open (QUIC still acknowledges packets) until the hub closes it or it is dropped.
pub async fn silent_peer(
    hub: SocketAddr,
    mut client: quinn::ClientConfig,
) -> anyhow::Result<SilentPeer> {
    let mut transport = quinn::TransportConfig::default();
    // Room for a few bytes of the hub's answers, then its writes block.
    transport.stream_receive_window(16u32.into());
    transport.receive_window(16u32.into());
    transport.keep_alive_interval(Some(Duration::from_millis(500)));
    client.transport_config(Arc::new(transport));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = ep.connect_with(client, hub, "hub")?.await?;
    let (mut send, recv) = conn.open_bi().await?;
    let hello = Frame {
        body: Some(Body::Hello(Hello {
            versions: frame::SUPPORTED_VERSIONS.to_vec(),
            agent_version: "silent".into(),
            boot_id: "silent".into(),
            next_seq: 1,
            oldest_seq: 1,
            ..Default::default()
        })),
    };
    send.write_all(&frame::frame_bytes(&hello, frame::DEFAULT_MAX_FRAME_LEN)?)
        .await?;
    Ok(SilentPeer {
        _endpoint: ep,
        conn,
        _send: send,
        _recv: recv,
    })
}

/// A connected [`silent_peer`]; dropping it closes the connection.
pub struct SilentPeer {
    _endpoint: quinn::Endpoint,
    /// The connection (to see whether and why the hub closed it).
    pub conn: quinn::Connection,
    _send: quinn::SendStream,
    _recv: quinn::RecvStream,
}
