//! ResourceSlices: how devices become slices, and the Publisher keeping the API server's copy
//! (the stand-in's, reached through kube's real client and a plain-http kubeconfig) in step.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::resource::v1::ResourceSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use passthroughd_dra::cluster::{self, ClusterError};
use passthroughd_dra::slices::{
    MAX_ATTRIBUTES_PER_DEVICE, MAX_DEVICES_PER_SLICE, OfferedDevice, Publisher, address_of,
    build_slices, device_name,
};
use passthroughd_dra_testkit::ApiServer;
use passthroughd_dra_testkit::apiserver;
use passthroughd_proto::PciAddress;
use serde_json::json;

const DRIVER: &str = "passthroughd.example.com";
const NODE: &str = "node-1";

fn address(text: &str) -> PciAddress {
    text.parse().unwrap()
}

/// `count` VFs on buses 1.., 32 to a bus, all free, with everything known about them.
fn devices(count: usize) -> Vec<OfferedDevice> {
    (0..count)
        .map(|i| OfferedDevice {
            address: PciAddress::new(0, 1 + (i / 32) as u8, (i % 32) as u8, 0).unwrap(),
            vendor_id: 0x8086,
            device_id: 0x154c,
            iommu_group: 100 + i as u32,
            numa_node: Some(0),
            pcie_root: Some("pci0000:00".to_owned()),
            pf: Some(address("0000:00:03.0")),
            free: true,
        })
        .collect()
}

fn owner(uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: NODE.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

fn device_names(slices: &[ResourceSlice]) -> Vec<String> {
    slices
        .iter()
        .flat_map(|s| s.spec.devices.iter().flatten())
        .map(|d| d.name.clone())
        .collect()
}

/// What Kubernetes takes as a DNS subdomain.
fn is_dns_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    name.len() <= 253
        && name.split('.').all(|part| {
            part.starts_with(alnum)
                && part.ends_with(alnum)
                && part.chars().all(|c| alnum(c) || c == '-')
        })
}

#[test]
fn three_hundred_devices_make_three_slices_of_one_pool() {
    // Given in reverse: the slices hold them by address all the same.
    let mut offered = devices(300);
    offered.reverse();
    let slices = build_slices(DRIVER, NODE, &owner("uid-1"), 7, &offered);

    assert_eq!(slices.len(), 3);
    for slice in &slices {
        let spec = &slice.spec;
        assert_eq!(spec.driver, DRIVER);
        assert_eq!(spec.node_name.as_deref(), Some(NODE));
        assert_eq!(spec.pool.name, NODE);
        assert_eq!(spec.pool.generation, 7);
        assert_eq!(spec.pool.resource_slice_count, 3);
        assert!(spec.node_selector.is_none() && spec.all_nodes.is_none());
        assert!(spec.per_device_node_selection.is_none());
        assert_eq!(slice.metadata.owner_references, Some(vec![owner("uid-1")]));
        let name = slice.metadata.name.as_deref().unwrap();
        assert!(is_dns_subdomain(name), "{name}");

        let devices = spec.devices.as_ref().unwrap();
        assert!(devices.len() <= MAX_DEVICES_PER_SLICE);
        for device in devices {
            let attributes = device.attributes.as_ref().unwrap().len();
            let capacities = device.capacity.as_ref().map_or(0, |c| c.len());
            assert!(attributes + capacities <= MAX_ATTRIBUTES_PER_DEVICE);
        }
    }
    let names = device_names(&slices);
    let mut sorted: Vec<String> = devices(300)
        .iter()
        .map(|d| device_name(d.address))
        .collect();
    sorted.sort_by_key(|name| address_of(name));
    assert_eq!(names, sorted, "every device once, in address order");
    let slice_names: std::collections::BTreeSet<_> =
        slices.iter().map(|s| s.metadata.name.clone()).collect();
    assert_eq!(slice_names.len(), 3);
}

#[test]
fn no_devices_make_no_slices_and_duplicates_count_once() {
    assert!(build_slices(DRIVER, NODE, &owner("u"), 1, &[]).is_empty());
    let mut twice = devices(2);
    twice.push(twice[0].clone());
    let slices = build_slices(DRIVER, NODE, &owner("u"), 1, &twice);
    assert_eq!(device_names(&slices).len(), 2);
}

#[test]
fn a_device_says_what_it_is() {
    let vf = &devices(1)[0];
    let slices = build_slices(DRIVER, NODE, &owner("u"), 1, std::slice::from_ref(vf));
    let device = &slices[0].spec.devices.as_ref().unwrap()[0];
    assert_eq!(device.name, "pci-0000-01-00-0");
    let attributes = serde_json::to_value(device.attributes.as_ref().unwrap()).unwrap();
    assert_eq!(
        attributes,
        json!({
            "resource.kubernetes.io/pciBusID": {"string": "0000:01:00.0"},
            "resource.kubernetes.io/pcieRoot": {"string": "pci0000:00"},
            "vendorID": {"string": "8086"},
            "deviceID": {"string": "154c"},
            "iommuGroup": {"int": 100},
            "numaNode": {"int": 0},
            "pfAddress": {"string": "0000:00:03.0"},
            "free": {"bool": true},
            "sriovVF": {"bool": true},
        })
    );

    // Less known, less said; a PF is no VF.
    let pf = OfferedDevice {
        address: address("0000:00:03.0"),
        vendor_id: 0x15b3,
        device_id: 0x1017,
        iommu_group: 9,
        numa_node: None,
        pcie_root: None,
        pf: None,
        free: false,
    };
    let slices = build_slices(DRIVER, NODE, &owner("u"), 1, &[pf]);
    let device = &slices[0].spec.devices.as_ref().unwrap()[0];
    let attributes = serde_json::to_value(device.attributes.as_ref().unwrap()).unwrap();
    assert_eq!(
        attributes,
        json!({
            "resource.kubernetes.io/pciBusID": {"string": "0000:00:03.0"},
            "vendorID": {"string": "15b3"},
            "deviceID": {"string": "1017"},
            "iommuGroup": {"int": 9},
            "free": {"bool": false},
            "sriovVF": {"bool": false},
        })
    );
}

#[test]
fn device_names_and_addresses_round_trip() {
    assert_eq!(device_name(address("0000:01:10.0")), "pci-0000-01-10-0");
    for text in [
        "0000:01:10.0",
        "0000:ff:1f.7",
        "10000:00:00.1",
        "ffffffff:12:03.4",
    ] {
        let name = device_name(address(text));
        assert!(
            name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_eq!(address_of(&name), Some(address(text)), "{name}");
    }
    for not_ours in [
        "gpu-0",
        "pci-0000-01-10",
        "pci-0000-01-10-0-1",
        "pci-0-1-10-0",
        "pci-0000-01-20-0",
        "pci-0000-01-10-8",
        "PCI-0000-01-10-0",
        "pci-0000-0g-10-0",
        "",
    ] {
        assert_eq!(address_of(not_ours), None, "{not_ours:?}");
    }
}

#[test]
fn long_node_names_still_give_valid_distinct_slice_names() {
    let long_node = format!("{}.example.com", "n".repeat(240));
    let slices = build_slices(DRIVER, &long_node, &owner("u"), 1, &devices(300));
    let names: Vec<&str> = slices
        .iter()
        .map(|s| s.metadata.name.as_deref().unwrap())
        .collect();
    for name in &names {
        assert!(is_dns_subdomain(name), "{name}");
    }
    assert!(names[0] != names[1] && names[1] != names[2]);
    // Two long nodes sharing the kept prefix still differ.
    let other = format!("{}.example.org", "n".repeat(240));
    let theirs = build_slices(DRIVER, &other, &owner("u"), 1, &devices(1));
    assert_ne!(theirs[0].metadata.name.as_deref(), Some(names[0]));
}

/// The stand-in with node-1, and a kubeconfig for it.
fn stand_in(test: &str) -> (ApiServer, String, PathBuf) {
    let server = ApiServer::start();
    let uid = server.add_node(NODE);
    let kubeconfig = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("slices-{test}-{}.kubeconfig", std::process::id()));
    server.write_kubeconfig(&kubeconfig);
    (server, uid, kubeconfig)
}

/// The writes among the requests after the first `since`.
fn writes_since(server: &ApiServer, since: usize) -> Vec<(String, String)> {
    server.requests()[since..]
        .iter()
        .filter(|(method, _)| method != "GET")
        .cloned()
        .collect()
}

/// Generation and slice count of every slice of node-1's pool.
fn pool(server: &ApiServer) -> Vec<(i64, i64)> {
    server
        .slices()
        .iter()
        .filter(|s| s.spec.pool.name == NODE && s.spec.driver == DRIVER)
        .map(|s| (s.spec.pool.generation, s.spec.pool.resource_slice_count))
        .collect()
}

#[tokio::test]
async fn the_publisher_writes_only_changes_and_never_reuses_a_generation() {
    let (server, node_uid, kubeconfig) = stand_in("publisher");
    // Another node's slice and another driver's slice on this node: never touched.
    let foreign = |name: &str, node: &str, driver: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {"driver": driver, "nodeName": node,
                     "pool": {"name": node, "generation": 50, "resourceSliceCount": 1}},
        })
    };
    let slices_path = "/apis/resource.k8s.io/v1/resourceslices";
    for body in [
        foreign("other-node", "node-2", DRIVER),
        foreign("other-driver", NODE, "gpu.example.com"),
    ] {
        assert_eq!(server.send("POST", slices_path, Some(&body)).0, 201);
    }

    let client = cluster::connect(Some(&kubeconfig)).await.unwrap();
    let owner = cluster::node_owner(&client, NODE).await.unwrap();
    assert_eq!(owner.uid, node_uid);
    let mut publisher = Publisher::new(client.clone(), DRIVER.into(), NODE.into(), owner.clone());
    let mut offered = devices(300);

    // First: three slices created at generation 1, owned by the node.
    assert!(publisher.publish(&offered).await.unwrap());
    assert_eq!(pool(&server), [(1, 3); 3]);
    assert!(
        server
            .slices()
            .iter()
            .filter(|s| s.spec.pool.name == NODE && s.spec.driver == DRIVER)
            .all(|s| s.metadata.owner_references == Some(vec![owner.clone()]))
    );
    // The list asked the server for this node's and driver's slices only.
    let list = server
        .requests()
        .into_iter()
        .find(|(method, path)| method == "GET" && path.contains("/resourceslices?"))
        .unwrap();
    assert!(
        list.1
            .contains("fieldSelector=spec.nodeName%3Dnode-1%2Cspec.driver%3D"),
        "{list:?}"
    );

    // The same again: nothing written.
    let before = server.requests().len();
    assert!(!publisher.publish(&offered).await.unwrap());
    assert_eq!(writes_since(&server, before), []);

    // One device leased: the whole pool moves to generation 2, in place.
    offered[5].free = false;
    let before = server.requests().len();
    assert!(publisher.publish(&offered).await.unwrap());
    assert_eq!(pool(&server), [(2, 3); 3]);
    let writes = writes_since(&server, before);
    assert_eq!(writes.len(), 3);
    assert!(
        writes.iter().all(|(method, _)| method == "PUT"),
        "{writes:?}"
    );
    let leased = server
        .slices()
        .iter()
        .flat_map(|s| s.spec.devices.clone().unwrap_or_default())
        .find(|d| d.name == device_name(offered[5].address))
        .unwrap();
    assert_eq!(leased.attributes.unwrap()["free"].bool, Some(false));

    // 300 down to 10: one slice left, the surplus deleted.
    let before = server.requests().len();
    assert!(publisher.publish(&offered[..10]).await.unwrap());
    assert_eq!(pool(&server), [(3, 1)]);
    let deletes = writes_since(&server, before)
        .into_iter()
        .filter(|(method, _)| method == "DELETE")
        .count();
    assert_eq!(deletes, 2);
    assert_eq!(device_names(&server.slices()).len(), 10);

    // A restarted plugin: what is there already is kept as it is...
    let mut restarted = Publisher::new(client.clone(), DRIVER.into(), NODE.into(), owner.clone());
    let before = server.requests().len();
    assert!(!restarted.publish(&offered[..10]).await.unwrap());
    assert_eq!(writes_since(&server, before), []);
    // ...and a change goes above the highest generation found, not back to 1.
    let mut fresh = Publisher::new(client.clone(), DRIVER.into(), NODE.into(), owner);
    assert!(fresh.publish(&offered[..11]).await.unwrap());
    assert_eq!(pool(&server), [(4, 1)]);

    // Nothing offered (every function gone): none of ours left, the others untouched.
    assert!(fresh.publish(&[]).await.unwrap());
    let left: Vec<String> = server
        .slices()
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(left, ["other-driver", "other-node"]);
    // Nothing to publish, nothing there: nothing to write.
    assert!(!fresh.publish(&[]).await.unwrap());
    std::fs::remove_file(kubeconfig).unwrap();
}

#[tokio::test]
async fn a_slice_changed_by_someone_else_is_rewritten() {
    let (server, _, kubeconfig) = stand_in("drift");
    let client = cluster::connect(Some(&kubeconfig)).await.unwrap();
    let owner = cluster::node_owner(&client, NODE).await.unwrap();
    let mut publisher = Publisher::new(client, DRIVER.into(), NODE.into(), owner);
    assert!(publisher.publish(&devices(3)).await.unwrap());

    // Someone drops a device from our slice behind our back.
    let mut slice = serde_json::to_value(&server.slices()[0]).unwrap();
    slice["spec"]["devices"].as_array_mut().unwrap().pop();
    let path = format!(
        "/apis/resource.k8s.io/v1/resourceslices/{}",
        slice["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(server.send("PUT", &path, Some(&slice)).0, 200);

    assert!(publisher.publish(&devices(3)).await.unwrap());
    assert_eq!(device_names(&server.slices()).len(), 3);
    assert_eq!(pool(&server), [(2, 1)]);
    std::fs::remove_file(kubeconfig).unwrap();
}

#[tokio::test]
async fn claims_nodes_and_refusals_through_the_real_client() {
    let (server, _, kubeconfig) = stand_in("cluster");
    let client = cluster::connect(Some(&kubeconfig)).await.unwrap();
    server.add_claim(ApiServer::allocated_claim(
        "vms",
        "vm1-nic",
        "claim-uid",
        DRIVER,
        NODE,
        "pci-0000-01-10-0",
        "nic",
    ));

    let claim = cluster::get_claim(&client, "vms", "vm1-nic").await.unwrap();
    assert_eq!(claim.metadata.uid.as_deref(), Some("claim-uid"));
    let results = claim
        .status
        .unwrap()
        .allocation
        .unwrap()
        .devices
        .unwrap()
        .results
        .unwrap();
    assert_eq!(results[0].device, "pci-0000-01-10-0");

    let missing = cluster::get_claim(&client, "vms", "gone")
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, ClusterError::ClaimNotFound { namespace, name } if namespace == "vms" && name == "gone"),
        "{missing:?}"
    );
    assert_eq!(
        missing.to_string(),
        "resource claim vms/gone does not exist"
    );

    let missing = cluster::node_owner(&client, "node-9").await.unwrap_err();
    assert!(
        matches!(missing, ClusterError::NodeNotFound { .. }),
        "{missing:?}"
    );

    // A slice the API server refuses comes back as a refusal with its code.
    let owner = cluster::node_owner(&client, NODE).await.unwrap();
    let mut bad = Publisher::new(client, "bad_driver.example.com".into(), NODE.into(), owner);
    let refused = bad.publish(&devices(1)).await.unwrap_err();
    assert_eq!(refused.code(), Some(422), "{refused:?}");
    assert!(refused.to_string().contains("422 Invalid"), "{refused}");
    assert!(server.slices().is_empty());

    // No server at all: a failed request, not a refusal.
    drop(server);
    let client = cluster::connect(Some(&kubeconfig)).await.unwrap();
    let unreachable = cluster::get_claim(&client, "vms", "vm1-nic")
        .await
        .unwrap_err();
    assert!(
        matches!(unreachable, ClusterError::Request { .. }),
        "{unreachable:?}"
    );
    assert_eq!(unreachable.code(), None);
    std::fs::remove_file(kubeconfig).unwrap();
}

#[tokio::test]
async fn a_kubeconfig_that_is_not_there_is_named() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-such.kubeconfig");
    let Err(error) = cluster::connect(Some(&path)).await else {
        panic!("connected with a kubeconfig that is not there");
    };
    assert!(
        matches!(error, ClusterError::Kubeconfig { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("no-such.kubeconfig"), "{error}");
}

/// An API server that accepts connections and never answers must not hold a prepare (and
/// every prepare queued behind it) past kubelet's 45 s.
#[test]
fn a_silent_api_server_fails_the_request_within_the_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let url = format!("http://{}", silent.local_addr().unwrap());
    std::fs::write(&kubeconfig, apiserver::kubeconfig_for(&url)).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = cluster::connect_within(Some(&kubeconfig), Duration::from_millis(300))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let failed = tokio::time::timeout(
            Duration::from_secs(10),
            cluster::get_claim(&client, "vms", "a"),
        )
        .await
        .expect("the request was not bounded")
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            failed
                .one_line()
                .contains("cannot read resource claim vms/a"),
            "{}",
            failed.one_line()
        );
    });
    drop(silent);
}
