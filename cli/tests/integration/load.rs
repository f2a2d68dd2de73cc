//! Load: 64 D-Bus clients at once, each on its own connection to a real `dbus-daemon`, issuing a
//! seeded random mix of list, show, status, assign, release, vf create/destroy and apply
//! requests to the real engine over the simulated kernel, while one device's unbind blocks in
//! the kernel for seconds every time. Asserted: no error other than the documented refusals
//! (Busy, Refused), no deadlock (every client finishes), readers and other groups never wait
//! for the blocked device, and at the end the kernel matches what the daemon says and stores:
//! no device without a driver, no journal left.
//!
//! Ignored by `cargo test` (it takes its time); `make load` runs it for 5 s with its numbers
//! printed, `make test-long` for 60 s. PT_LOAD_SECS sets the duration, PT_LOAD_SEED the seed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use passthroughd::{Engine, EngineConfig, PciIds};
use passthroughd_proto::PciAddress;
use passthroughd_proto::dbus::{Error as DbusError, ManagerProxy};
use passthroughd_testkit::sim::{SimDevice, SimKernel, SimOp};

const CLIENTS: usize = 64;
const NICS: u8 = 16;
const PF: &str = "0000:05:00.0";
/// Its unbind takes BLOCK every time (a VM holding the device).
const BLOCKED: &str = "0000:40:00.0";
const BLOCK: Duration = Duration::from_secs(3);

fn nic(i: u8) -> String {
    format!("0000:{:02x}:00.0", 0x10 + i)
}

/// xorshift64*: reproducible from the seed printed with the results.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[derive(Default)]
struct Tally {
    /// Per operation: [done, refused, busy, nothing to release].
    outcomes: BTreeMap<&'static str, [u64; 4]>,
    list: Vec<Duration>,
    assign: Vec<Duration>,
    failures: Vec<String>,
    /// The first Busy answers, to show why.
    busy: Vec<String>,
}

impl Tally {
    fn record(&mut self, op: &'static str, result: Result<(), DbusError>) {
        let entry = self.outcomes.entry(op).or_default();
        match result {
            Ok(()) => entry[0] += 1,
            Err(DbusError::Refused(_)) => entry[1] += 1,
            Err(DbusError::Busy(m)) => {
                entry[2] += 1;
                if self.busy.len() < 8 {
                    self.busy.push(format!("{op}: {m}"));
                }
            }
            // docs/dbus.md: releasing what is not assigned is an InvalidArgument.
            Err(DbusError::InvalidArgument(m)) if m.ends_with("nothing to release") => {
                entry[3] += 1
            }
            Err(e) => self.failures.push(format!("{op}: {e}")),
        }
    }

    fn merge(&mut self, other: Tally) {
        for (op, counts) in other.outcomes {
            let entry = self.outcomes.entry(op).or_default();
            for (sum, n) in entry.iter_mut().zip(counts) {
                *sum += n;
            }
        }
        self.list.extend(other.list);
        self.assign.extend(other.assign);
        self.failures.extend(other.failures);
        self.busy
            .extend(other.busy.into_iter().take(8 - self.busy.len().min(8)));
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn client(bus: Arc<TestBus>, seed: u64, until: Instant) -> Tally {
    let connection = bus.bus().builder().unwrap().build().await.unwrap();
    let proxy = ManagerProxy::new(&connection).await.unwrap();
    let mut rng = Rng(seed | 1);
    let mut tally = Tally::default();
    while Instant::now() < until {
        let target = nic(rng.below(NICS.into()) as u8);
        let runtime = rng.below(2) == 0;
        let roll = rng.below(100);
        let started = Instant::now();
        match roll {
            0..=34 => {
                let result = proxy.list_functions().await.map(drop);
                tally.list.push(started.elapsed());
                tally.record("list", result);
            }
            35..=44 => tally.record("show", proxy.show(&target).await.map(drop)),
            45..=47 => tally.record("status", proxy.status().await.map(drop)),
            48..=65 => {
                let result = proxy.assign(&[&target], runtime, false, false).await;
                tally.assign.push(started.elapsed());
                tally.record("assign", result.map(drop));
            }
            66..=81 => tally.record(
                "release",
                proxy.release(&[&target], runtime, false).await.map(drop),
            ),
            82..=86 => {
                let count = 1 + rng.below(4) as u32;
                let assign = rng.below(2) == 0;
                let result = proxy.vf_create(PF, count, assign, runtime, false).await;
                tally.record("vf create", result.map(drop));
            }
            87..=89 => tally.record("vf destroy", proxy.vf_destroy(PF, true).await.map(drop)),
            90..=93 => tally.record("apply --dry-run", proxy.apply(true).await.map(drop)),
            94..=96 => tally.record(
                "assign blocked",
                proxy.assign(&[BLOCKED], true, false, false).await.map(drop),
            ),
            _ => tally.record(
                "release blocked",
                proxy.release(&[BLOCKED], true, false).await.map(drop),
            ),
        }
    }
    tally
}

#[test]
#[ignore = "load: run by `make load` and `make test-long`"]
fn sixty_four_clients_mixed_requests_and_a_blocked_device() {
    let secs: u64 = std::env::var("PT_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("PT_LOAD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });

    let bus = Arc::new(TestBus::start());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let sim = Arc::new(SimKernel::new(&root).unwrap());
    let mut functions: Vec<String> = (0..NICS).map(nic).collect();
    functions.push(BLOCKED.to_owned());
    for (group, address) in functions.iter().enumerate() {
        let mut device = SimDevice::new(
            address.parse().unwrap(),
            0x020000,
            Some("igb"),
            30 + group as u32,
        );
        device.device_id = 0x10c9;
        sim.add_device(&device).unwrap();
    }
    sim.add_igb_pf(PF.parse().unwrap(), 10, 20).unwrap();
    sim.delay(SimOp::Unbind, BLOCKED.parse().unwrap(), BLOCK);
    let state_dir = dir.path().join("state");
    let (engine, _) = Engine::open(EngineConfig {
        root: sim.sysfs().clone(),
        state_dir: state_dir.clone(),
        kernel: sim.clone(),
        ids: Arc::new(PciIds::empty()),
        config: None,
    })
    .unwrap();
    // As in the daemon, where device events keep the readers' cache honest.
    engine.enable_inventory_cache();
    let (_service, _connection) = serve_engine(&bus, engine);

    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut tally = Tally::default();
    clients.block_on(async {
        let tasks: Vec<_> = (0..CLIENTS as u64)
            .map(|i| tokio::spawn(client(Arc::clone(&bus), seed.wrapping_add(i), until)))
            .collect();
        for task in tasks {
            // A deadlock shows here: every request is bounded by the write limit and the
            // group wait, so a client that does not finish long after the end is stuck.
            let done = tokio::time::timeout(Duration::from_secs(secs + 120), task)
                .await
                .expect("a client never finished: a request is stuck")
                .unwrap();
            tally.merge(done);
        }
    });
    let elapsed = started.elapsed();

    let requests: u64 = tally.outcomes.values().flatten().sum();
    let (list50, list99) = (
        percentile(&mut tally.list, 0.5),
        percentile(&mut tally.list, 0.99),
    );
    let (assign50, assign99) = (
        percentile(&mut tally.assign, 0.5),
        percentile(&mut tally.assign, 0.99),
    );
    println!(
        "load: {CLIENTS} clients for {secs} s (seed {seed}): {requests} requests in {:.1} s, \
         {:.0}/s; list p50 {} p99 {} ({} calls); assign p50 {} p99 {} ({} calls, other groups \
         and the blocked one together)",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        ms(list50),
        ms(list99),
        tally.list.len(),
        ms(assign50),
        ms(assign99),
        tally.assign.len(),
    );
    for (op, [done, refused, busy, nothing]) in &tally.outcomes {
        println!(
            "load:   {op:<16} {done:>6} done {refused:>6} refused {busy:>6} busy {nothing:>6} \
             nothing to release"
        );
    }
    for line in &tally.busy {
        println!("load:   busy: {line}");
    }
    assert!(
        tally.failures.is_empty(),
        "{} undocumented errors (seed {seed}), first: {:?}",
        tally.failures.len(),
        &tally.failures[..tally.failures.len().min(5)]
    );
    assert!(tally.outcomes["list"][0] > 0 && tally.outcomes["assign"][0] > 0);
    // Readers never wait for the device blocked in the kernel.
    assert!(
        list99 < BLOCK,
        "list p99 {} reached the blocked unbind ({} s)",
        ms(list99),
        BLOCK.as_secs()
    );

    // At rest: every function has a driver, and vfio-pci exactly where the daemon says.
    sim.clear_delays();
    let status = json(&bus, &["status"]);
    // address → what is wrong with the assignment, if anything.
    let assigned: BTreeMap<String, Option<String>> = status["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["address"].as_str().unwrap().to_owned(),
                a["state"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let state_text = std::fs::read_to_string(state_dir.join("state.toml")).unwrap_or_default();
    for address in &functions {
        let driver = sim.driver_of(address.parse().unwrap());
        let expected = match assigned.get(address) {
            Some(None) => "vfio-pci",
            // A persistent assignment released with --runtime: on its driver until the next
            // start or apply.
            Some(Some(state)) if state.contains("released for now") => "igb",
            Some(Some(state)) => panic!("{address}: {state}"),
            None => "igb",
        };
        assert_eq!(
            driver.as_deref(),
            Some(expected),
            "{address}: {:?}",
            assigned.get(address)
        );
        if state_text.contains(&format!("\"{address}\"")) {
            assert!(
                assigned.contains_key(address),
                "{address} is stored, not shown"
            );
        }
    }
    let vfs = json(&bus, &["vf", "list", PF]);
    for vf in vfs.as_array().unwrap() {
        let address: PciAddress = vf["address"].as_str().unwrap().parse().unwrap();
        let driver = sim.driver_of(address);
        assert!(driver.is_some(), "VF {address} has no driver: {vf}");
        assert_eq!(
            driver.as_deref() == Some("vfio-pci"),
            vf["assigned"] == true,
            "VF {address}: {vf}"
        );
    }
    let left: Vec<String> = std::fs::read_dir(&state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("journal-") || n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "left in the state dir: {left:?}");
}

fn json(bus: &TestBus, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let o = ctl(&bus.address, &all, false);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}
