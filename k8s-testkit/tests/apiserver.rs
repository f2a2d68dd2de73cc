//! The API server stand-in refuses what a real one refuses, and stores nothing it refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use passthroughd_dra_testkit::ApiServer;
use serde_json::{Value, json};

const SLICES: &str = "/apis/resource.k8s.io/v1/resourceslices";

/// A valid slice of `devices` devices, each with one attribute.
fn slice(name: &str, node: &str, devices: usize) -> Value {
    let devices: Vec<Value> = (0..devices)
        .map(|i| json!({"name": format!("dev-{i}"), "attributes": {"free": {"bool": true}}}))
        .collect();
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name, "labels": {"app": "test"}},
        "spec": {
            "driver": "passthroughd.example.com",
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": devices,
        },
    })
}

/// POSTs `body` as a slice and checks it was refused with `code`, that the answer is a Status
/// naming `needle`, and that nothing was stored. Returns the message.
fn refused(server: &ApiServer, body: &Value, code: u16, needle: &str) -> String {
    let (got, answer) = server.send("POST", SLICES, Some(body));
    assert_eq!(got, code, "{answer:#}");
    assert_eq!(answer["kind"], "Status");
    assert_eq!(answer["apiVersion"], "v1");
    assert_eq!(answer["status"], "Failure");
    assert_eq!(answer["code"], code);
    let message = answer["message"].as_str().unwrap().to_owned();
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    assert!(server.slices().is_empty(), "a refused slice was stored");
    message
}

#[test]
fn a_valid_slice_is_stored_with_what_the_server_fills_in() {
    let server = ApiServer::start();
    let (code, created) = server.send("POST", SLICES, Some(&slice("a", "node-1", 2)));
    assert_eq!(code, 201, "{created:#}");
    assert_eq!(created["kind"], "ResourceSlice");
    assert_eq!(created["apiVersion"], "resource.k8s.io/v1");
    let meta = &created["metadata"];
    assert!(meta["uid"].as_str().is_some_and(|uid| !uid.is_empty()));
    assert!(meta["resourceVersion"].as_str().is_some());
    assert!(meta["creationTimestamp"].as_str().is_some());
    assert_eq!(meta["generation"], 1);

    let (code, fetched) = server.send("GET", &format!("{SLICES}/a"), None);
    assert_eq!((code, &fetched), (200, &created));
    assert_eq!(server.slices().len(), 1);

    let (code, again) = server.send("POST", SLICES, Some(&slice("a", "node-1", 2)));
    assert_eq!(
        (code, again["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );
}

#[test]
fn an_unknown_field_is_refused_with_400() {
    let server = ApiServer::start();
    let mut misspelled = slice("a", "node-1", 1);
    misspelled["spec"]["devices"][0]["attributes"]["free"] = json!({"boolean": true});
    let message = refused(&server, &misspelled, 400, "unknown field");
    assert!(
        message.contains("spec.devices[0].attributes.free.boolean"),
        "{message}"
    );

    let mut extra = slice("a", "node-1", 1);
    extra["spec"]["nodeNmae"] = json!("node-1");
    refused(&server, &extra, 400, "spec.nodeNmae");

    // A wrong type is as much a 400 as an unknown name.
    let mut wrong = slice("a", "node-1", 1);
    wrong["spec"]["pool"]["generation"] = json!("1");
    refused(&server, &wrong, 400, "does not decode");
}

#[test]
fn a_slice_of_129_devices_is_refused() {
    let server = ApiServer::start();
    refused(
        &server,
        &slice("a", "node-1", 129),
        422,
        "spec.devices: Too many: 129",
    );
    // 128 is the limit, not over it.
    let (code, answer) = server.send("POST", SLICES, Some(&slice("a", "node-1", 128)));
    assert_eq!(code, 201, "{answer:#}");
}

#[test]
fn a_device_with_33_attributes_is_refused() {
    let server = ApiServer::start();
    let mut body = slice("a", "node-1", 1);
    let attributes: serde_json::Map<String, Value> = (0..33)
        .map(|i| (format!("a{i}"), json!({"int": i})))
        .collect();
    body["spec"]["devices"][0]["attributes"] = Value::Object(attributes);
    let message = refused(&server, &body, 422, "spec.devices[0]: Too many: 33");
    assert!(message.contains("must not exceed 32"), "{message}");

    // Attributes and capacities count together.
    let mut mixed = slice("a", "node-1", 1);
    let attributes: serde_json::Map<String, Value> = (0..30)
        .map(|i| (format!("a{i}"), json!({"bool": true})))
        .collect();
    mixed["spec"]["devices"][0]["attributes"] = Value::Object(attributes);
    mixed["spec"]["devices"][0]["capacity"] =
        json!({"c1": {"value": "1"}, "c2": {"value": "1"}, "c3": {"value": "1"}});
    refused(&server, &mixed, 422, "33");
}

#[test]
fn bad_device_names_are_refused() {
    let server = ApiServer::start();
    for name in ["PCI-0000", "pci.0000", "-pci", &"p".repeat(64)] {
        let mut body = slice("a", "node-1", 1);
        body["spec"]["devices"][0]["name"] = json!(name);
        refused(&server, &body, 422, "spec.devices[0].name");
    }
    let mut twice = slice("a", "node-1", 2);
    twice["spec"]["devices"][1]["name"] = json!("dev-0");
    refused(&server, &twice, 422, "spec.devices[1].name");
}

#[test]
fn an_attribute_needs_exactly_one_short_value() {
    let server = ApiServer::start();
    let mut two = slice("a", "node-1", 1);
    two["spec"]["devices"][0]["attributes"]["free"] = json!({"bool": true, "string": "yes"});
    refused(&server, &two, 422, "exactly one value");

    let mut none = slice("a", "node-1", 1);
    none["spec"]["devices"][0]["attributes"]["free"] = json!({});
    refused(&server, &none, 422, "exactly one value");

    let mut long = slice("a", "node-1", 1);
    long["spec"]["devices"][0]["attributes"]["free"] = json!({"string": "x".repeat(65)});
    refused(&server, &long, 422, "may not be more than 64");

    let mut bad_name = slice("a", "node-1", 1);
    bad_name["spec"]["devices"][0]["attributes"] = json!({"9lives": {"bool": true}});
    refused(&server, &bad_name, 422, "C identifier");
}

#[test]
fn slice_names_drivers_pools_and_node_selection_are_checked() {
    let server = ApiServer::start();
    let mut name = slice("Node_1-slice", "node-1", 1);
    refused(&server, &name, 422, "metadata.name");
    name["metadata"]["name"] = json!("x".repeat(254));
    refused(&server, &name, 422, "metadata.name");

    let mut driver = slice("a", "node-1", 1);
    driver["spec"]["driver"] = json!("not a domain");
    refused(&server, &driver, 422, "spec.driver");

    let mut pool = slice("a", "node-1", 1);
    pool["spec"]["pool"]["name"] = json!("");
    refused(&server, &pool, 422, "spec.pool.name");

    let mut both = slice("a", "node-1", 1);
    both["spec"]["allNodes"] = json!(true);
    refused(&server, &both, 422, "multiple fields are set");

    let mut neither = slice("a", "node-1", 1);
    neither["spec"].as_object_mut().unwrap().remove("nodeName");
    refused(&server, &neither, 422, "exactly one of");

    let mut device_node = slice("a", "node-1", 1);
    device_node["spec"]["devices"][0]["nodeName"] = json!("node-1");
    refused(&server, &device_node, 422, "perDeviceNodeSelection");
}

#[test]
fn a_put_with_a_stale_resource_version_is_a_conflict() {
    let server = ApiServer::start();
    let (_, created) = server.send("POST", SLICES, Some(&slice("a", "node-1", 1)));
    let first = created["metadata"]["resourceVersion"].clone();

    let mut update = slice("a", "node-1", 2);
    update["metadata"]["resourceVersion"] = first.clone();
    let (code, updated) = server.send("PUT", &format!("{SLICES}/a"), Some(&update));
    assert_eq!(code, 200, "{updated:#}");
    assert_ne!(updated["metadata"]["resourceVersion"], first);
    assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(updated["metadata"]["generation"], 2, "the spec changed");

    // The same version again is stale now.
    let (code, answer) = server.send("PUT", &format!("{SLICES}/a"), Some(&update));
    assert_eq!((code, answer["reason"].as_str()), (409, Some("Conflict")));
    assert_eq!(server.slices()[0].spec.devices.as_ref().unwrap().len(), 2);

    // An update is validated like a create, and some fields stay as they were.
    let mut moved = slice("a", "node-2", 2);
    moved["metadata"]["resourceVersion"] = updated["metadata"]["resourceVersion"].clone();
    let (code, answer) = server.send("PUT", &format!("{SLICES}/a"), Some(&moved));
    assert_eq!(code, 422, "{answer:#}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("spec.nodeName")
    );
    let (code, _) = server.send(
        "PUT",
        &format!("{SLICES}/b"),
        Some(&slice("b", "node-1", 1)),
    );
    assert_eq!(code, 404);
}

#[test]
fn lists_honour_field_and_label_selectors() {
    let server = ApiServer::start();
    for (name, node) in [("a", "node-1"), ("b", "node-2"), ("c", "node-1")] {
        let (code, _) = server.send("POST", SLICES, Some(&slice(name, node, 1)));
        assert_eq!(code, 201);
    }
    let names = |query: &str| -> Vec<String> {
        let (code, list) = server.send("GET", &format!("{SLICES}?{query}"), None);
        assert_eq!(code, 200, "{list:#}");
        assert_eq!(list["kind"], "ResourceSliceList");
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(""), ["a", "b", "c"]);
    assert_eq!(names("fieldSelector=spec.nodeName%3Dnode-1"), ["a", "c"]);
    assert_eq!(
        names("fieldSelector=spec.nodeName%3Dnode-2%2Cspec.driver%3Dpassthroughd.example.com"),
        ["b"]
    );
    assert!(names("fieldSelector=spec.driver%3Dother.example.com").is_empty());
    assert_eq!(names("fieldSelector=spec.nodeName!%3Dnode-1"), ["b"]);
    assert_eq!(names("labelSelector=app%3Dtest"), ["a", "b", "c"]);
    assert!(names("labelSelector=app%3Dother").is_empty());

    let (code, answer) = server.send(
        "GET",
        &format!("{SLICES}?fieldSelector=spec.pool%3Dx"),
        None,
    );
    assert_eq!((code, answer["reason"].as_str()), (400, Some("BadRequest")));

    let (code, deleted) = server.send("DELETE", &format!("{SLICES}/a"), None);
    assert_eq!(
        (code, deleted["metadata"]["name"].as_str()),
        (200, Some("a"))
    );
    assert_eq!(names(""), ["b", "c"]);
    let (code, answer) = server.send("DELETE", &format!("{SLICES}/a"), None);
    assert_eq!((code, answer["reason"].as_str()), (404, Some("NotFound")));
}

#[test]
fn nodes_and_claims_for_test_setup() {
    let server = ApiServer::start();
    let uid = server.add_node("node-1");
    let (code, node) = server.send("GET", "/api/v1/nodes/node-1", None);
    assert_eq!(
        (code, node["metadata"]["uid"].as_str()),
        (200, Some(uid.as_str()))
    );
    assert_eq!(node["kind"], "Node");

    let (code, node) = server.send(
        "POST",
        "/api/v1/nodes",
        Some(&json!({"metadata": {"name": "node-2"}})),
    );
    assert_eq!(code, 201, "{node:#}");
    assert_ne!(node["metadata"]["uid"].as_str(), Some(uid.as_str()));

    // A claim keeps the uid and the allocation it was given: there is no scheduler here.
    let claims = "/apis/resource.k8s.io/v1/namespaces/vms/resourceclaims";
    let claim = ApiServer::allocated_claim(
        "vms",
        "vm1",
        "claim-uid",
        "passthroughd.example.com",
        "node-1",
        "pci-0000-01-10-0",
        "nic",
    );
    let (code, created) = server.send("POST", claims, Some(&serde_json::to_value(&claim).unwrap()));
    assert_eq!(code, 201, "{created:#}");
    let (code, fetched) = server.send("GET", &format!("{claims}/vm1"), None);
    assert_eq!(code, 200);
    assert_eq!(fetched["metadata"]["uid"], "claim-uid");
    assert_eq!(
        fetched["status"]["allocation"]["devices"]["results"][0]["device"],
        "pci-0000-01-10-0"
    );

    // A claim posted to another namespace than its own is a bad request.
    let (code, _) = server.send(
        "POST",
        "/apis/resource.k8s.io/v1/namespaces/other/resourceclaims",
        Some(&serde_json::to_value(&claim).unwrap()),
    );
    assert_eq!(code, 400);

    assert!(server.remove_claim("vms", "vm1"));
    let (code, answer) = server.send("GET", &format!("{claims}/vm1"), None);
    assert_eq!((code, answer["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(answer["details"]["name"], "vm1");

    let (code, answer) = server.send("GET", "/apis/apps/v1/deployments", None);
    assert_eq!((code, answer["kind"].as_str()), (404, Some("Status")));
}

#[test]
fn the_request_log_has_every_request_and_no_setup() {
    let server = ApiServer::start();
    server.add_node("node-1");
    server.send("GET", "/api/v1/nodes/node-1", None);
    server.send("GET", &format!("{SLICES}?labelSelector=a%3Db"), None);
    assert_eq!(
        server.requests(),
        [
            ("GET".to_owned(), "/api/v1/nodes/node-1".to_owned()),
            ("GET".to_owned(), format!("{SLICES}?labelSelector=a%3Db")),
        ]
    );
}
