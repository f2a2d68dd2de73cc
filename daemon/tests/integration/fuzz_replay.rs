//! The fuzz targets' inputs in the ordinary suite: every file under `tests/fuzz/TARGET/` (the
//! seeds `make fuzz` starts from, and every input a fuzzer ever crashed a target on, kept as
//! `crash-*`) goes through its target again, so a fixed crash stays fixed without AFL++.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use crate::common::*;
use passthroughd::engine::EngineOptions;
use passthroughd::engine::plan::Plan;
use passthroughd::store::journal;
use passthroughd_proto::{AssignOptions, VfCreateOptions};
use passthroughd_testkit::fuzz::TARGETS;

fn inputs_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fuzz")
        .join(target)
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(inputs_dir(target))
        .unwrap_or_else(|e| panic!("tests/fuzz/{target}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_seed_and_every_past_crash_passes_its_target() {
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let files = inputs(name);
        assert!(!files.is_empty(), "tests/fuzz/{name} has no seed");
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let run = std::panic::catch_unwind(|| target(&data));
            assert!(run.is_ok(), "{name}: {} crashes it", file.display());
            replayed += 1;
        }
    }
    println!("fuzz inputs replayed: {replayed}");
}

/// The journal seeds are plans as today's executor writes them (else the fuzzer would start
/// from files that stop at the first field).
#[test]
fn the_journal_seeds_are_plans_of_today() {
    let seeds: Vec<_> = inputs("journal")
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
        })
        .collect();
    assert!(seeds.len() >= 3, "{seeds:?}");
    for seed in seeds {
        let text = std::fs::read_to_string(&seed).unwrap();
        if let Err(why) = journal::parse::<Plan>(&text) {
            panic!(
                "{}: {why} (rewrite the seeds: cargo test -p passthroughd --test integration \
                 fuzz_replay -- --ignored)",
                seed.display()
            );
        }
    }
}

/// Writes `tests/fuzz/journal/seed-*`: the journal each of a few operations leaves when the
/// daemon dies before its second step.
#[test]
#[ignore = "rewrites the journal seeds in the source tree"]
fn write_journal_seeds() {
    type Op = fn(&Host, &passthroughd::Engine);
    let ops: [(&str, Op); 4] = [
        ("assign-group", |_, m| {
            let group = AssignOptions {
                group: true,
                ..AssignOptions::default()
            };
            let _ = m.assign(&caller(), &[a(PAIR0)], group);
        }),
        ("vf-create", |_, m| {
            let opts = VfCreateOptions {
                assign: true,
                runtime: false,
                force: false,
            };
            let _ = m.vf_create(&caller(), a(PF), 3, opts);
        }),
        ("lease-start", |_, m| {
            let owner = "libvirt:vm1".parse().unwrap();
            let _ = m.lease_start(&caller(), &owner, &[a(NIC), a(NIC2)]);
        }),
        ("apply-sriov", |h, m| {
            h.write_config(&format!(
                "version = 1\n[[sriov]]\npf = \"{PF}\"\ncount = 2\nassign = \"all\"\n"
            ));
            m.reload();
            let _ = m.apply(&caller(), false);
        }),
    ];
    for (name, op) in ops {
        let host = sriov_host();
        let mut options = EngineOptions::for_root(&host.root());
        options.die_before_step = Some(2);
        {
            let (m, _) = passthroughd::Engine::open_with(host.config(), options).unwrap();
            op(&host, &m);
        }
        let journal = host
            .state_files()
            .into_iter()
            .find(|n| n.starts_with("journal-"))
            .unwrap_or_else(|| panic!("{name} left no journal"));
        std::fs::copy(
            host.state_dir().join(journal),
            inputs_dir("journal").join(format!("seed-{name}.json")),
        )
        .unwrap();
    }
}
