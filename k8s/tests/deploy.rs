//! The manifests in deploy/ (no cluster applies them here): every object reads into its
//! k8s-openapi type (Kubernetes 1.34) and writes back with nothing lost, so a misspelled or
//! misplaced field fails; and they agree with the plugin: its flags, the paths it uses, the
//! permissions its calls need, the DeviceClasses the examples name.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::api::resource::v1::{DeviceClass, ResourceClaimTemplate};
use serde_json::Value;

fn documents(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Drops nulls, which the typed form does not keep.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let typed: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", doc["kind"]));
    assert_eq!(
        without_nulls(serde_json::to_value(&typed).unwrap()),
        without_nulls(doc.clone()),
        "{} lost or changed a field on the way through its type",
        doc["kind"]
    );
    typed
}

fn all() -> Vec<Value> {
    [
        "namespace.yaml",
        "rbac.yaml",
        "daemonset.yaml",
        "deviceclass.yaml",
        "examples/pod-claim.yaml",
        "examples/kubevirt-vmi.yaml",
    ]
    .into_iter()
    .flat_map(documents)
    .collect()
}

#[test]
fn every_object_is_read_by_its_type_without_loss() {
    let mut kinds = Vec::new();
    for doc in all() {
        let kind = doc["kind"].as_str().unwrap().to_owned();
        match kind.as_str() {
            "Namespace" => drop(round_trip::<Namespace>(&doc)),
            "ServiceAccount" => drop(round_trip::<ServiceAccount>(&doc)),
            "ClusterRole" => drop(round_trip::<ClusterRole>(&doc)),
            "ClusterRoleBinding" => drop(round_trip::<ClusterRoleBinding>(&doc)),
            "DaemonSet" => drop(round_trip::<DaemonSet>(&doc)),
            "DeviceClass" => drop(round_trip::<DeviceClass>(&doc)),
            "ResourceClaimTemplate" => drop(round_trip::<ResourceClaimTemplate>(&doc)),
            "Pod" => drop(round_trip::<Pod>(&doc)),
            // KubeVirt's types are not in k8s-openapi: its shape is checked below.
            "VirtualMachineInstance" => assert_eq!(doc["apiVersion"], "kubevirt.io/v1"),
            other => panic!("no check for kind {other}"),
        }
        kinds.push(kind);
    }
    assert_eq!(kinds.len(), 11, "{kinds:?}");
}

#[test]
fn the_daemonset_passes_flags_the_plugin_has_and_mounts_the_paths_it_uses() {
    let doc = documents("daemonset.yaml").remove(0);
    let daemonset: DaemonSet = serde_json::from_value(doc).unwrap();
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_passthroughd-dra"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let mounts: Vec<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for arg in container.args.iter().flatten() {
        let (flag, value) = arg.split_once('=').unwrap();
        assert!(
            help.contains(&format!("{flag} ")),
            "{flag} is not a flag of the plugin"
        );
        if value.starts_with('/') {
            assert!(
                mounts.iter().any(|m| Path::new(value).starts_with(m)),
                "{value} ({flag}) is not under a mounted host path"
            );
        }
    }
    let env: Vec<&str> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    assert!(
        env.contains(&"NODE_NAME"),
        "--node-name comes from NODE_NAME"
    );
    assert!(mounts.contains(&"/run/dbus"), "the host's system bus");
}

#[test]
fn the_cluster_role_grants_what_the_plugin_calls() {
    let role: ClusterRole = serde_json::from_value(
        documents("rbac.yaml")
            .into_iter()
            .find(|d| d["kind"] == "ClusterRole")
            .unwrap(),
    )
    .unwrap();
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                granted.insert((resource.clone(), verb.clone()));
            }
        }
    }
    // What cluster.rs and slices.rs call.
    for (resource, verb) in [
        ("resourceclaims", "get"),
        ("nodes", "get"),
        ("resourceslices", "list"),
        ("resourceslices", "create"),
        ("resourceslices", "update"),
        ("resourceslices", "delete"),
    ] {
        assert!(
            granted.contains(&(resource.into(), verb.into())),
            "{verb} {resource} is not granted"
        );
    }
    assert!(
        !granted.iter().any(|(_, verb)| verb == "*"),
        "no wildcard verbs"
    );
}

#[test]
fn the_examples_name_classes_that_exist_and_select_this_driver() {
    let classes: Vec<DeviceClass> = documents("deviceclass.yaml")
        .into_iter()
        .map(|d| serde_json::from_value(d).unwrap())
        .collect();
    for class in &classes {
        for selector in class.spec.selectors.iter().flatten() {
            let cel = &selector.cel.as_ref().unwrap().expression;
            assert!(
                cel.contains("device.driver == \"vfio.passthroughd.io\""),
                "{cel}"
            );
        }
    }
    let names: Vec<&str> = classes
        .iter()
        .map(|c| c.metadata.name.as_deref().unwrap())
        .collect();
    let mut used = 0;
    for file in ["examples/pod-claim.yaml", "examples/kubevirt-vmi.yaml"] {
        for doc in documents(file) {
            if doc["kind"] != "ResourceClaimTemplate" {
                continue;
            }
            let template: ResourceClaimTemplate = serde_json::from_value(doc).unwrap();
            for request in template.spec.spec.devices.unwrap().requests.unwrap() {
                let class = request.exactly.unwrap().device_class_name;
                assert!(
                    names.contains(&class.as_str()),
                    "{file}: no DeviceClass {class}"
                );
                used += 1;
            }
        }
    }
    assert_eq!(used, 2);
}
