//! A simulated edge/hub pair on a virtual clock, with a network that drops, duplicates,
//! reorders and delays frames and cuts the connection. No sockets, no sleeps.

use std::collections::BTreeMap;

use crate::frame::{Body, Frame, FrameDecoder, Records, WireSample, frame_bytes};
use crate::ids::{DeviceId, NodeId, PropertyId};
use crate::value::{Quality, Sample, Timestamp, Value};

use super::*;

#[derive(Clone, Copy, Debug)]
struct Knobs {
    loss: f64,
    dup: f64,
    /// Max extra random delay per frame (reorders frames).
    jitter_ms: u64,
    latency_ms: u64,
    /// Probability per ms of a connection cut.
    cut: f64,
    commit_ms: u64,
}

struct InFlight {
    at: Millis,
    order: u64,
    epoch: u64,
    bytes: Vec<u8>,
}

struct Pipe {
    frames: Vec<InFlight>,
    order: u64,
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            frames: vec![],
            order: 0,
        }
    }

    fn send(&mut self, rng: &mut fastrand::Rng, k: &Knobs, now: Millis, epoch: u64, body: Body) {
        // Every frame really goes through the codec.
        let bytes = frame_bytes(&Frame { body: Some(body) }, 1 << 20)
            .unwrap()
            .to_vec();
        if rng.f64() < k.loss {
            return;
        }
        let copies = if rng.f64() < k.dup { 2 } else { 1 };
        for _ in 0..copies {
            self.order += 1;
            let jitter = if k.jitter_ms > 0 {
                rng.u64(0..=k.jitter_ms)
            } else {
                0
            };
            self.frames.push(InFlight {
                at: now + k.latency_ms + jitter,
                order: self.order,
                epoch,
                bytes: bytes.clone(),
            });
        }
    }

    fn due(&mut self, now: Millis, epoch: u64) -> Vec<Body> {
        self.frames.retain(|f| f.epoch == epoch);
        let mut due: Vec<InFlight> = vec![];
        let mut keep = vec![];
        for f in self.frames.drain(..) {
            if f.at <= now {
                due.push(f)
            } else {
                keep.push(f)
            }
        }
        self.frames = keep;
        due.sort_by_key(|f| (f.at, f.order));
        due.into_iter()
            .map(|f| {
                let mut d = FrameDecoder::new(1 << 20);
                d.push(&f.bytes);
                d.next_frame().unwrap().unwrap()
            })
            .collect()
    }
}

/// The hub's durable store, modelled.
#[derive(Default)]
struct Store {
    records: BTreeMap<u64, Sample>,
    stored: u64,
    duplicates: u64,
    gaps: Vec<(u64, u64)>,
}

impl Store {
    fn commit(&mut self, first_seq: u64, samples: &[Sample]) -> u64 {
        for (i, s) in samples.iter().enumerate() {
            let seq = first_seq + i as u64;
            if seq <= self.stored {
                self.duplicates += 1;
                continue;
            }
            assert_eq!(seq, self.stored + 1, "store asked to commit across a gap");
            self.records.insert(seq, s.clone());
            self.stored = seq;
        }
        self.stored
    }
}

struct Commit {
    at: Millis,
    epoch: u64,
    first_seq: u64,
    samples: Vec<Sample>,
    gap: Option<(u64, u64)>,
}

fn sample(seq: u64) -> Sample {
    Sample {
        device: DeviceId::new(format!("d{}", seq % 3)).unwrap(),
        property: PropertyId::new("p").unwrap(),
        value: Some(Value::UInt(seq)),
        quality: Quality::Good,
        ts: Timestamp(seq),
    }
}

struct World {
    rng: fastrand::Rng,
    k: Knobs,
    now: Millis,
    epoch: u64,
    connected: bool,
    reconnect_at: Millis,
    edge: EdgeSession,
    hub: Option<HubSession>,
    /// Outbox: every record ever accepted, by seq (the edge deletes acked ones).
    outbox: BTreeMap<u64, Sample>,
    produced: u64,
    store: Store,
    commits: Vec<Commit>,
    to_hub: Pipe,
    to_edge: Pipe,
    acked_events: u64,
    /// Commits complete in the order they were issued (one committer, as in the real store).
    last_commit_at: Millis,
}

impl World {
    fn new(seed: u64, k: Knobs) -> Self {
        let cfg = EdgeConfig {
            keepalive_ms: 200,
            idle_timeout_ms: 1_000,
            resend_timeout_ms: 300,
            max_batch_records: 16,
            max_inflight_records: 64,
            ..EdgeConfig::default()
        };
        World {
            rng: fastrand::Rng::with_seed(seed),
            k,
            now: 0,
            epoch: 0,
            connected: false,
            reconnect_at: 0,
            edge: EdgeSession::new(cfg, 0, 1),
            hub: None,
            outbox: BTreeMap::new(),
            produced: 0,
            store: Store::default(),
            commits: vec![],
            to_hub: Pipe::new(),
            to_edge: Pipe::new(),
            acked_events: 0,
            last_commit_at: 0,
        }
    }

    fn produce(&mut self, n: u64) {
        for _ in 0..n {
            self.produced += 1;
            self.outbox.insert(self.produced, sample(self.produced));
        }
        self.edge.handle_appended(self.produced + 1);
    }

    fn cut(&mut self) {
        self.connected = false;
        self.epoch += 1;
        self.edge.handle_disconnected();
        self.hub = None;
        self.reconnect_at = self.now + 50;
    }

    fn connect(&mut self) {
        self.connected = true;
        self.epoch += 1;
        let node = NodeId::new("n1").unwrap();
        let hub_cfg = HubConfig {
            idle_timeout_ms: 1_000,
            ..HubConfig::default()
        };
        self.hub = Some(HubSession::new(hub_cfg, node, self.store.stored, self.now));
        self.edge.handle_connected(self.now);
    }

    fn pump(&mut self) {
        // Edge: transmit.
        while let Some(t) = self.edge.poll_transmit() {
            let body = match t {
                Transmit::Frame(b) => b,
                Transmit::Records { first_seq, count } => Body::Records(Records {
                    first_seq,
                    samples: (first_seq..first_seq + count as u64)
                        .map(|s| WireSample::from(&self.outbox[&s]))
                        .collect(),
                    backlog: 0,
                }),
                Transmit::Control { .. } => panic!("the simulated edge has no control log"),
            };
            if self.connected {
                self.to_hub
                    .send(&mut self.rng, &self.k, self.now, self.epoch, body);
            }
        }
        while let Some(ev) = self.edge.poll_event() {
            match ev {
                EdgeEvent::Acked { upto } => {
                    self.acked_events += 1;
                    // The outbox deletes acknowledged records: they must be stored.
                    assert!(
                        upto <= self.store.stored,
                        "ack of {upto} beyond stored {}",
                        self.store.stored
                    );
                    let keep = self.outbox.split_off(&(upto + 1));
                    self.outbox = keep;
                }
                EdgeEvent::Closed(_) => self.cut(),
                EdgeEvent::Rebased { .. } | EdgeEvent::Gap { .. } => panic!("unexpected {ev:?}"),
                EdgeEvent::Welcomed { .. } | EdgeEvent::ControlAcked { .. } => {}
                EdgeEvent::Desired(_) | EdgeEvent::ControlRebased { .. } => {
                    panic!("unexpected {ev:?}")
                }
            }
        }
        let epoch = self.epoch;
        if let Some(hub) = self.hub.as_mut() {
            while let Some(b) = hub.poll_transmit() {
                self.to_edge
                    .send(&mut self.rng, &self.k, self.now, epoch, b);
            }
            let mut closed = false;
            while let Some(ev) = hub.poll_event() {
                match ev {
                    HubEvent::Store { first_seq, samples } => {
                        let at = self
                            .last_commit_at
                            .max(self.now + self.rng.u64(0..=self.k.commit_ms));
                        self.last_commit_at = at;
                        self.commits.push(Commit {
                            at,
                            epoch,
                            first_seq,
                            samples,
                            gap: None,
                        });
                    }
                    HubEvent::Gap { from, to } => {
                        let at = self
                            .last_commit_at
                            .max(self.now + self.rng.u64(0..=self.k.commit_ms));
                        self.last_commit_at = at;
                        self.commits.push(Commit {
                            at,
                            epoch,
                            first_seq: from,
                            samples: vec![],
                            gap: Some((from, to)),
                        });
                    }
                    HubEvent::Closed(_) => closed = true,
                    _ => {}
                }
            }
            if closed {
                self.cut();
            }
        }
    }

    fn step(&mut self) {
        self.now += 1;
        if !self.connected && self.now >= self.reconnect_at {
            self.connect();
        } else if self.connected && self.rng.f64() < self.k.cut {
            self.cut();
        }
        // Commits complete in order of issue; acks go to the live session only.
        while self.commits.first().is_some_and(|c| c.at <= self.now) {
            let c = self.commits.remove(0);
            let upto = match c.gap {
                Some((from, to)) => {
                    self.store.gaps.push((from, to));
                    self.store.stored = self.store.stored.max(to);
                    self.store.stored
                }
                None => self.store.commit(c.first_seq, &c.samples),
            };
            if let Some(h) = self.hub.as_mut().filter(|_| c.epoch == self.epoch) {
                h.handle_stored(upto);
            }
        }
        if self.connected {
            for b in self.to_hub.due(self.now, self.epoch) {
                if let Some(h) = self.hub.as_mut() {
                    let _ = h.handle_frame(b, self.now);
                }
            }
            for b in self.to_edge.due(self.now, self.epoch) {
                let _ = self.edge.handle_frame(b, self.now);
            }
        }
        if self.edge.poll_timeout().is_some_and(|t| t <= self.now) {
            self.edge.handle_timeout(self.now);
        }
        let now = self.now;
        if let Some(h) = self
            .hub
            .as_mut()
            .filter(|h| h.poll_timeout().is_some_and(|t| t <= now))
        {
            h.handle_timeout(now);
        }
        self.pump();
    }
}

fn run(seed: u64, k: Knobs) -> World {
    let mut w = World::new(seed, k);
    // Faulty phase: produce records while the network misbehaves.
    for t in 0..20_000u64 {
        if t % 10 == 0 {
            let n = w.rng.u64(0..8);
            w.produce(n);
        }
        w.step();
    }
    // Healing phase: a clean network until everything is acknowledged.
    w.k = Knobs {
        loss: 0.0,
        dup: 0.0,
        jitter_ms: 0,
        cut: 0.0,
        ..k
    };
    for _ in 0..20_000 {
        w.step();
        if w.edge.acked() == w.produced && w.edge.backlog() == 0 {
            break;
        }
    }
    w
}

fn check(w: &World) {
    assert!(
        w.produced > 1000,
        "the test produced too little: {}",
        w.produced
    );
    assert_eq!(
        w.edge.acked(),
        w.produced,
        "not everything was acknowledged"
    );
    assert_eq!(w.store.stored, w.produced);
    assert!(
        w.store.gaps.is_empty(),
        "no record may be lost: {:?}",
        w.store.gaps
    );
    assert_eq!(
        w.store.records.len() as u64,
        w.produced,
        "every record stored exactly once"
    );
    for (seq, s) in &w.store.records {
        assert_eq!(
            s,
            &sample(*seq),
            "record {seq} stored with the wrong content"
        );
    }
    assert!(w.outbox.is_empty());
}

const CLEAN: Knobs = Knobs {
    loss: 0.0,
    dup: 0.0,
    jitter_ms: 0,
    latency_ms: 2,
    cut: 0.0,
    commit_ms: 3,
};

#[test]
fn clean_network_delivers_everything_once() {
    let w = run(1, CLEAN);
    check(&w);
    assert_eq!(w.store.duplicates, 0);
}

#[test]
fn lossy_duplicating_reordering_network() {
    for seed in 0..8 {
        let w = run(
            seed,
            Knobs {
                loss: 0.05,
                dup: 0.05,
                jitter_ms: 20,
                ..CLEAN
            },
        );
        check(&w);
    }
}

#[test]
fn connection_cuts_and_slow_commits() {
    for seed in 100..108 {
        let w = run(
            seed,
            Knobs {
                cut: 0.002,
                commit_ms: 40,
                latency_ms: 10,
                ..CLEAN
            },
        );
        check(&w);
    }
}

#[test]
fn everything_at_once() {
    for seed in 200..206 {
        let w = run(
            seed,
            Knobs {
                loss: 0.03,
                dup: 0.03,
                jitter_ms: 30,
                latency_ms: 5,
                cut: 0.001,
                commit_ms: 25,
            },
        );
        check(&w);
    }
}

#[test]
fn acks_wait_for_durable_commit() {
    // With very slow commits the edge never sees an ack for something not yet stored (the
    // assertion sits in the Acked handler), and its window caps what is in flight.
    let w = run(
        7,
        Knobs {
            commit_ms: 400,
            ..CLEAN
        },
    );
    check(&w);
}

#[test]
fn hub_refuses_incompatible_versions_and_violations() {
    let node = NodeId::new("n").unwrap();
    let mut h = HubSession::new(HubConfig::default(), node.clone(), 0, 0);
    let hello = crate::frame::Hello {
        versions: vec![99],
        ..Default::default()
    };
    assert!(matches!(
        h.handle_frame(Body::Hello(hello), 1),
        Err(SessionError::Incompatible { .. })
    ));
    assert!(matches!(h.poll_transmit(), Some(Body::Goodbye(_))));

    let mut h = HubSession::new(HubConfig::default(), node.clone(), 0, 0);
    let r = Records {
        first_seq: 1,
        samples: vec![WireSample::from(&sample(1))],
        backlog: 0,
    };
    assert!(matches!(
        h.handle_frame(Body::Records(r), 1),
        Err(SessionError::Violation(_))
    ));

    let mut h = HubSession::new(HubConfig::default(), node, 0, 0);
    let hello = crate::frame::Hello {
        versions: vec![1],
        ..Default::default()
    };
    h.handle_frame(Body::Hello(hello), 1).unwrap();
    let mut bad = WireSample::from(&sample(1));
    bad.property = "no spaces allowed".into();
    let r = Records {
        first_seq: 1,
        samples: vec![bad],
        backlog: 0,
    };
    assert!(matches!(
        h.handle_frame(Body::Records(r), 2),
        Err(SessionError::InvalidRecord(_))
    ));
}

#[test]
fn hub_refuses_a_hello_with_oversized_strings_or_version_lists() {
    let node = NodeId::new("n").unwrap();
    let long = "x".repeat(super::hub::MAX_HELLO_STRING + 1);
    let hellos = [
        crate::frame::Hello {
            versions: vec![1],
            agent_version: long.clone(),
            ..Default::default()
        },
        crate::frame::Hello {
            versions: vec![1],
            boot_id: long.clone(),
            ..Default::default()
        },
        crate::frame::Hello {
            versions: vec![1],
            store_id: long,
            ..Default::default()
        },
        crate::frame::Hello {
            versions: vec![1; super::hub::MAX_HELLO_VERSIONS + 1],
            ..Default::default()
        },
    ];
    for hello in hellos {
        let mut h = HubSession::new(HubConfig::default(), node.clone(), 0, 0);
        assert!(matches!(
            h.handle_frame(Body::Hello(hello), 1),
            Err(SessionError::Violation(m)) if m.starts_with("hello: ")
        ));
        assert!(matches!(h.poll_transmit(), Some(Body::Goodbye(_))));
        assert!(
            h.poll_event()
                .is_some_and(|e| matches!(e, HubEvent::Closed(_)))
        );
    }
    // At the limit it is accepted.
    let mut h = HubSession::new(HubConfig::default(), node, 0, 0);
    let ok = crate::frame::Hello {
        versions: vec![1],
        agent_version: "v".repeat(super::hub::MAX_HELLO_STRING),
        ..Default::default()
    };
    h.handle_frame(Body::Hello(ok), 1).unwrap();
    assert!(matches!(h.poll_transmit(), Some(Body::Welcome(_))));
}

#[test]
fn edge_resumes_from_hub_position_and_rebases() {
    // Edge restarted with records 5..=9 pending, the hub has stored 7: resume at 8.
    let mut e = EdgeSession::new(EdgeConfig::default(), 4, 10);
    e.handle_connected(0);
    assert!(matches!(
        e.poll_transmit(),
        Some(Transmit::Frame(Body::Hello(_)))
    ));
    let w = crate::frame::Welcome {
        version: 1,
        stored_seq: 7,
        ..Default::default()
    };
    e.handle_frame(Body::Welcome(w), 1).unwrap();
    assert_eq!(
        e.poll_event(),
        Some(EdgeEvent::Welcomed {
            version: 1,
            stored_seq: 7
        })
    );
    assert_eq!(e.poll_event(), Some(EdgeEvent::Acked { upto: 7 }));
    assert_eq!(
        e.poll_transmit(),
        Some(Transmit::Records {
            first_seq: 8,
            count: 2
        })
    );

    // Edge lost its outbox (next 1) but the hub has 50: continue at 51.
    let mut e = EdgeSession::new(EdgeConfig::default(), 0, 1);
    e.handle_connected(0);
    let _ = e.poll_transmit();
    let w = crate::frame::Welcome {
        version: 1,
        stored_seq: 50,
        ..Default::default()
    };
    e.handle_frame(Body::Welcome(w), 1).unwrap();
    let evs: Vec<_> = std::iter::from_fn(|| e.poll_event()).collect();
    assert!(
        evs.contains(&EdgeEvent::Rebased { next_seq: 51 }),
        "{evs:?}"
    );

    // An ack for records never sent is a violation.
    let mut e = EdgeSession::new(EdgeConfig::default(), 0, 3);
    e.handle_connected(0);
    let w = crate::frame::Welcome {
        version: 1,
        stored_seq: 0,
        ..Default::default()
    };
    e.handle_frame(Body::Welcome(w), 1).unwrap();
    assert!(
        e.handle_frame(Body::Ack(crate::frame::Ack { stored_seq: 9 }), 2)
            .is_err()
    );
}

/// Passes everything `e` wants sent to `h` as frames; records are made from `sample`.
fn edge_to_hub(e: &mut EdgeSession, h: &mut HubSession, now: Millis) {
    while let Some(t) = e.poll_transmit() {
        let body = match t {
            Transmit::Frame(b) => b,
            Transmit::Records { first_seq, count } => Body::Records(Records {
                first_seq,
                samples: (first_seq..first_seq + count as u64)
                    .map(|s| WireSample::from(&sample(s)))
                    .collect(),
                backlog: 0,
            }),
            Transmit::Control { .. } => continue,
        };
        h.handle_frame(body, now).unwrap();
    }
}

fn hub_to_edge(h: &mut HubSession, e: &mut EdgeSession, now: Millis) {
    while let Some(b) = h.poll_transmit() {
        e.handle_frame(b, now).unwrap();
    }
}

#[test]
fn records_lost_at_the_end_of_the_outbox_become_a_gap_and_sending_goes_on() {
    // The hub stored 3; 4..=9 were refused by a full outbox and nothing else is pending.
    let node = NodeId::new("n").unwrap();
    let mut h = HubSession::new(HubConfig::default(), node, 3, 0);
    let mut e = EdgeSession::new(EdgeConfig::default(), 3, 10);
    e.handle_lost(9);
    assert_eq!(e.backlog(), 0);
    e.handle_connected(0);
    edge_to_hub(&mut e, &mut h, 1);
    let evs: Vec<_> = std::iter::from_fn(|| h.poll_event()).collect();
    assert!(evs.contains(&HubEvent::Gap { from: 4, to: 9 }), "{evs:?}");
    hub_to_edge(&mut h, &mut e, 2);
    // New records after the gap are stored, never asked for again.
    e.handle_appended(12);
    edge_to_hub(&mut e, &mut h, 3);
    let evs: Vec<_> = std::iter::from_fn(|| h.poll_event()).collect();
    assert!(
        evs.iter().any(
            |ev| matches!(ev, HubEvent::Store { first_seq: 10, samples } if samples.len() == 2)
        ),
        "{evs:?}"
    );
    assert!(h.poll_transmit().is_none(), "no resend asked");
}

#[test]
fn a_hub_rolled_back_behind_the_edges_acks_records_a_gap_instead_of_asking_forever() {
    // The edge had 1..=20 acknowledged and holds nothing; the hub came back from a snapshot
    // that stored only 1..=12.
    let node = NodeId::new("n").unwrap();
    let mut h = HubSession::new(HubConfig::default(), node, 12, 0);
    let mut e = EdgeSession::new(EdgeConfig::default(), 20, 21);
    e.handle_connected(0);
    edge_to_hub(&mut e, &mut h, 1);
    let evs: Vec<_> = std::iter::from_fn(|| h.poll_event()).collect();
    assert!(evs.contains(&HubEvent::Gap { from: 13, to: 20 }), "{evs:?}");
    hub_to_edge(&mut h, &mut e, 2);
    let evs: Vec<_> = std::iter::from_fn(|| e.poll_event()).collect();
    assert!(
        evs.contains(&EdgeEvent::Gap { from: 13, to: 20 }),
        "the edge reports it too: {evs:?}"
    );
    e.handle_appended(22);
    edge_to_hub(&mut e, &mut h, 3);
    let evs: Vec<_> = std::iter::from_fn(|| h.poll_event()).collect();
    assert!(
        evs.iter()
            .any(|ev| matches!(ev, HubEvent::Store { first_seq: 21, .. })),
        "{evs:?}"
    );
    assert!(h.poll_transmit().is_none(), "no resend asked");
}

#[test]
fn a_hub_behind_the_edges_control_acks_continues_after_them() {
    // The hub's store holds control records up to 2; the edge had 1..=7 acknowledged.
    let node = NodeId::new("n").unwrap();
    let mut h = HubSession::new(HubConfig::default(), node, 0, 0).with_control_stored(2);
    let hello = crate::frame::Hello {
        versions: vec![2],
        control_oldest_seq: 8,
        ..Default::default()
    };
    h.handle_frame(Body::Hello(hello), 1).unwrap();
    let evs: Vec<_> = std::iter::from_fn(|| h.poll_event()).collect();
    assert!(
        evs.contains(&HubEvent::ControlGap { from: 3, to: 7 }),
        "{evs:?}"
    );
    h.handle_control_stored(7);
    // The next control record is accepted, not a violation.
    let c = crate::frame::Control {
        seq: 8,
        kind: Some(crate::frame::ControlKind::Status(Default::default())),
    };
    h.handle_frame(Body::Control(c), 2).unwrap();
    let evs: Vec<_> = std::iter::from_fn(|| h.poll_event()).collect();
    assert!(
        evs.iter()
            .any(|ev| matches!(ev, HubEvent::Control(c) if c.seq == 8)),
        "{evs:?}"
    );
}

#[test]
fn an_edge_behind_the_hub_renumbers_instead_of_acknowledging() {
    // The outbox holds 3..=5 (acked 2); the hub has stored 40 of another history.
    let mut e = EdgeSession::new(EdgeConfig::default(), 2, 6).with_control(4, 6);
    e.handle_connected(0);
    let _ = e.poll_transmit();
    let w = crate::frame::Welcome {
        version: 2,
        stored_seq: 40,
        control_seq: 9,
        ..Default::default()
    };
    e.handle_frame(Body::Welcome(w), 1).unwrap();
    let evs: Vec<_> = std::iter::from_fn(|| e.poll_event()).collect();
    assert!(
        !evs.iter()
            .any(|ev| matches!(ev, EdgeEvent::Acked { .. } | EdgeEvent::ControlAcked { .. })),
        "nothing of ours is acknowledged: {evs:?}"
    );
    assert!(
        evs.contains(&EdgeEvent::Rebased { next_seq: 41 }),
        "{evs:?}"
    );
    assert!(
        evs.contains(&EdgeEvent::ControlRebased { next_seq: 10 }),
        "{evs:?}"
    );
    // The outbox renumbered its three records to 41..=43: they are sent.
    e.handle_appended(44);
    assert_eq!(
        e.poll_transmit(),
        Some(Transmit::Records {
            first_seq: 41,
            count: 3
        })
    );
}

#[test]
fn hub_accounts_for_records_the_edge_dropped() {
    // The hub stored 3; the edge's outbox now starts at 10 (4..=9 were dropped when full).
    let node = NodeId::new("n").unwrap();
    let mut h = HubSession::new(HubConfig::default(), node, 3, 0);
    let hello = crate::frame::Hello {
        versions: vec![1],
        oldest_seq: 10,
        next_seq: 12,
        ..Default::default()
    };
    h.handle_frame(Body::Hello(hello), 1).unwrap();
    let evs: Vec<_> = std::iter::from_fn(|| h.poll_event()).collect();
    assert!(evs.contains(&HubEvent::Gap { from: 4, to: 9 }), "{evs:?}");
    let r = Records {
        first_seq: 10,
        samples: vec![WireSample::from(&sample(10))],
        backlog: 0,
    };
    h.handle_frame(Body::Records(r), 2).unwrap();
    assert!(matches!(h.poll_event(), Some(HubEvent::Backlog(0))));
    assert!(matches!(
        h.poll_event(),
        Some(HubEvent::Store { first_seq: 10, .. })
    ));
}

#[test]
fn idle_edge_pings_then_times_out() {
    let mut e = EdgeSession::new(
        EdgeConfig {
            keepalive_ms: 100,
            idle_timeout_ms: 300,
            ..EdgeConfig::default()
        },
        0,
        1,
    );
    e.handle_connected(0);
    let _ = e.poll_transmit();
    assert_eq!(e.poll_timeout(), Some(100));
    e.handle_timeout(100);
    assert!(matches!(
        e.poll_transmit(),
        Some(Transmit::Frame(Body::Ping(_)))
    ));
    e.handle_timeout(300);
    assert!(matches!(
        e.state(),
        EdgeState::Closed(SessionError::IdleTimeout(_))
    ));
}

fn control(seq: u64) -> crate::frame::Control {
    crate::frame::Control {
        seq,
        kind: Some(crate::frame::ControlKind::Status(
            crate::frame::DesiredStatus {
                device: "d".into(),
                property: "p".into(),
                version: seq,
                outcome: 1,
                ..Default::default()
            },
        )),
    }
}

/// Runs hello/welcome between `e` and `h`; returns the hub's events.
fn handshake(e: &mut EdgeSession, h: &mut HubSession) -> Vec<HubEvent> {
    e.handle_connected(0);
    while let Some(t) = e.poll_transmit() {
        if let Transmit::Frame(b) = t {
            h.handle_frame(b, 1).unwrap();
        }
    }
    while let Some(b) = h.poll_transmit() {
        e.handle_frame(b, 2).unwrap();
    }
    std::iter::from_fn(|| h.poll_event()).collect()
}

#[test]
fn control_records_and_desired_values_flow_in_version_2() {
    let node = NodeId::new("n").unwrap();
    // Edge with control records 1..=3 pending; hub has stored none.
    let mut e = EdgeSession::new(EdgeConfig::default(), 0, 1).with_control(0, 4);
    let mut h = HubSession::new(HubConfig::default(), node.clone(), 0, 0);
    handshake(&mut e, &mut h);
    assert!(e.desired_enabled() && h.desired_enabled());
    let _: Vec<_> = std::iter::from_fn(|| e.poll_event()).collect();
    assert_eq!(
        e.poll_transmit(),
        Some(Transmit::Control {
            first_seq: 1,
            count: 3
        })
    );
    for seq in 1..=3 {
        h.handle_frame(Body::Control(control(seq)), 3).unwrap();
    }
    // A duplicate is not an event, a gap is a violation (the stream is ordered).
    h.handle_frame(Body::Control(control(2)), 3).unwrap();
    let evs: Vec<_> = std::iter::from_fn(|| h.poll_event()).collect();
    assert_eq!(evs.len(), 3, "{evs:?}");
    assert!(matches!(&evs[0], HubEvent::Control(c) if c.seq == 1));
    h.handle_control_stored(2);
    let acks: Vec<_> = std::iter::from_fn(|| h.poll_transmit()).collect();
    assert!(acks.contains(&Body::ControlAck(crate::frame::ControlAck { upto: 2 })));
    for b in acks {
        e.handle_frame(b, 4).unwrap();
    }
    assert_eq!(e.poll_event(), Some(EdgeEvent::ControlAcked { upto: 2 }));
    assert_eq!(e.control_backlog(), 1);
    // The hub sends a desired value; the edge reports it.
    let d = crate::frame::DesiredFrame {
        device: "d".into(),
        property: "p".into(),
        version: 1,
        ..Default::default()
    };
    assert!(h.send_desired(d.clone()));
    e.handle_frame(h.poll_transmit().unwrap(), 5).unwrap();
    assert_eq!(e.poll_event(), Some(EdgeEvent::Desired(d)));

    // Reconnect: the hub stored 2, so record 3 is sent again, and only it.
    e.handle_disconnected();
    let mut h = HubSession::new(HubConfig::default(), node.clone(), 0, 0).with_control_stored(2);
    handshake(&mut e, &mut h);
    let _: Vec<_> = std::iter::from_fn(|| e.poll_event()).collect();
    assert_eq!(
        e.poll_transmit(),
        Some(Transmit::Control {
            first_seq: 3,
            count: 1
        })
    );
    // A gap in control records closes the hub session.
    let mut h2 = HubSession::new(HubConfig::default(), node.clone(), 0, 0);
    let mut e2 = EdgeSession::new(EdgeConfig::default(), 0, 1);
    handshake(&mut e2, &mut h2);
    assert!(h2.handle_frame(Body::Control(control(5)), 3).is_err());

    // The edge lost its control log (next 1) but the hub stored 9: continue at 10.
    let mut e = EdgeSession::new(EdgeConfig::default(), 0, 1);
    let mut h = HubSession::new(HubConfig::default(), node, 0, 0).with_control_stored(9);
    handshake(&mut e, &mut h);
    let evs: Vec<_> = std::iter::from_fn(|| e.poll_event()).collect();
    assert!(
        evs.contains(&EdgeEvent::ControlRebased { next_seq: 10 }),
        "{evs:?}"
    );
}

#[test]
fn a_version_1_peer_interoperates_without_desired_values() {
    let node = NodeId::new("n").unwrap();
    // An older edge speaks only version 1.
    let mut h = HubSession::new(HubConfig::default(), node.clone(), 0, 0);
    h.handle_frame(
        Body::Hello(crate::frame::Hello {
            versions: vec![1],
            next_seq: 1,
            ..Default::default()
        }),
        1,
    )
    .unwrap();
    let welcome = h.poll_transmit();
    assert!(
        matches!(&welcome, Some(Body::Welcome(w)) if w.version == 1 && w.control_seq == 0),
        "{welcome:?}"
    );
    assert!(!h.desired_enabled());
    assert!(!h.send_desired(crate::frame::DesiredFrame::default()));
    assert_eq!(
        h.poll_transmit(),
        None,
        "nothing queued for a version 1 edge"
    );
    assert!(h.handle_frame(Body::Control(control(1)), 2).is_err());

    // An older hub answers version 1: the edge sends no control records.
    let mut e = EdgeSession::new(EdgeConfig::default(), 0, 1).with_control(0, 3);
    e.handle_connected(0);
    let _ = e.poll_transmit();
    e.handle_frame(
        Body::Welcome(crate::frame::Welcome {
            version: 1,
            ..Default::default()
        }),
        1,
    )
    .unwrap();
    assert!(!e.desired_enabled());
    assert_eq!(e.poll_transmit(), None);
    assert!(
        e.handle_frame(Body::Desired(crate::frame::DesiredFrame::default()), 2)
            .is_err(),
        "a desired value in version 1 is a violation"
    );
}
