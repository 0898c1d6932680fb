//! `edgesync-agent probe` end to end: the binary against an in-process Modbus TCP server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Output;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_modbus::server::Service;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// Holding registers 0..4 hold 12.5f32 (ABCD) then 123456.0f32 (CDAB); input registers answer
/// "illegal data address".
#[derive(Clone)]
struct Plc;

const HOLDING: [u16; 4] = [0x4148, 0x0000, 0x2000, 0x47F1];

impl Service for Plc {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let result = match req.request {
            Request::ReadHoldingRegisters(start, count) => {
                let (s, c) = (usize::from(start), usize::from(count));
                match HOLDING.get(s..s + c) {
                    Some(regs) => Ok(Response::ReadHoldingRegisters(regs.to_vec())),
                    None => Err(ExceptionCode::IllegalDataAddress),
                }
            }
            _ => Err(ExceptionCode::IllegalDataAddress),
        };
        Box::pin(async move { result })
    }
}

async fn serve() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(listener);
    tokio::spawn(async move {
        let on_connected = |stream, socket_addr| async move {
            accept_tcp_connection(stream, socket_addr, |_| Ok(Some(Plc)))
        };
        let _ = server.serve(&on_connected, |_err| {}).await;
    });
    addr
}

async fn probe(args: &[&str]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgesync-agent"))
        .arg("probe")
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), child)
        .await
        .expect("probe did not finish in time")
        .unwrap()
}

#[tokio::test]
async fn probe_prints_every_interpretation() {
    let addr = serve().await.to_string();
    let out = probe(&["--endpoint", &addr, "--address", "40001", "--count", "4"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("holding_register registers 0..=3 (40001..=40004)"),
        "{stdout}"
    );
    assert!(stdout.contains("0x4148"), "{stdout}");
    let cells = |offset: &str, order: &str| -> Vec<String> {
        stdout
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|c| c.len() > 6 && c[0] == offset && c[1] == order)
            .unwrap_or_else(|| panic!("no row {offset} {order}:\n{stdout}"))
    };
    assert_eq!(cells("0", "ABCD")[6], "12.5");
    assert_eq!(cells("2", "CDAB")[6], "123456");

    // The same range given as a table and a 0-based offset.
    let out = probe(&[
        "--endpoint",
        &addr,
        "--table",
        "holding_register",
        "--address",
        "2",
        "--count",
        "2",
    ])
    .await;
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("(40003..=40004)"), "{stdout}");
}

#[tokio::test]
async fn exceptions_and_timeouts_exit_non_zero() {
    let addr = serve().await.to_string();
    let out = probe(&["--endpoint", &addr, "--address", "30001", "--count", "2"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exception 0x02"), "{stderr}");

    // A server that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let out = probe(&[
        "--endpoint",
        &silent_addr,
        "--address",
        "40001",
        "--timeout-ms",
        "300",
    ])
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no answer from"), "{stderr}");
    keep.abort();

    // Nothing listening.
    let out = probe(&["--endpoint", "127.0.0.1:1", "--address", "40001"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}
