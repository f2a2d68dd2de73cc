//! The kubelet-facing contract, pinned: every method path, message and field number of the
//! protos in k8s/proto/, as kubelet 1.34/1.35 publishes them (k8s.io/kubelet/pkg/apis/dra/v1,
//! .../dra/v1beta1 and .../pluginregistration/v1). A field renumbered or a method renamed in
//! the .proto files fails here, not against a real kubelet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use passthroughd_dra::grpc::{DESCRIPTORS, dra_v1, dra_v1beta1, registration};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

fn descriptors() -> FileDescriptorSet {
    FileDescriptorSet::decode(DESCRIPTORS).unwrap()
}

/// `package.Service/Method` -> (input type, output type), for every method of every service.
fn methods() -> Vec<(String, String, String)> {
    let mut all = Vec::new();
    for file in descriptors().file {
        for service in &file.service {
            for method in &service.method {
                all.push((
                    format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    method.input_type().to_owned(),
                    method.output_type().to_owned(),
                ));
            }
        }
    }
    all.sort();
    all
}

fn message(package: &str, name: &str) -> DescriptorProto {
    descriptors()
        .file
        .into_iter()
        .filter(|f| f.package() == package)
        .flat_map(|f| f.message_type)
        .find(|m| m.name() == name)
        .unwrap_or_else(|| panic!("no message {package}.{name}"))
}

/// (field name, number, type, repeated) of a message.
fn fields(package: &str, name: &str) -> Vec<(String, i32, Type, bool)> {
    message(package, name)
        .field
        .iter()
        .map(|f| {
            (
                f.name().to_owned(),
                f.number(),
                f.r#type(),
                f.label() == Label::Repeated,
            )
        })
        .collect()
}

fn f(name: &str, number: i32, kind: Type, repeated: bool) -> (String, i32, Type, bool) {
    (name.to_owned(), number, kind, repeated)
}

#[test]
fn every_method_path_is_kubelets() {
    let mut expected = Vec::new();
    for version in ["v1", "v1beta1"] {
        let p = format!("k8s.io.kubelet.pkg.apis.dra.{version}");
        for (method, input, output) in [
            (
                "NodePrepareResources",
                "NodePrepareResourcesRequest",
                "NodePrepareResourcesResponse",
            ),
            (
                "NodeUnprepareResources",
                "NodeUnprepareResourcesRequest",
                "NodeUnprepareResourcesResponse",
            ),
        ] {
            expected.push((
                format!("/{p}.DRAPlugin/{method}"),
                format!(".{p}.{input}"),
                format!(".{p}.{output}"),
            ));
        }
    }
    for (method, input, output) in [
        ("GetInfo", "InfoRequest", "PluginInfo"),
        (
            "NotifyRegistrationStatus",
            "RegistrationStatus",
            "RegistrationStatusResponse",
        ),
    ] {
        expected.push((
            format!("/pluginregistration.Registration/{method}"),
            format!(".pluginregistration.{input}"),
            format!(".pluginregistration.{output}"),
        ));
    }
    expected.sort();
    assert_eq!(methods(), expected);
}

#[test]
fn every_dra_field_number_is_kubelets_in_both_versions() {
    use Type::{Message as M, String as S};
    for version in ["v1", "v1beta1"] {
        let p = format!("k8s.io.kubelet.pkg.apis.dra.{version}");
        let claims = || [f("claims", 1, M, true)];
        assert_eq!(fields(&p, "NodePrepareResourcesRequest"), claims());
        assert_eq!(fields(&p, "NodeUnprepareResourcesRequest"), claims());
        // map<string, ...> is a repeated entry message, field 1.
        assert_eq!(fields(&p, "NodePrepareResourcesResponse"), claims());
        assert_eq!(fields(&p, "NodeUnprepareResourcesResponse"), claims());
        assert_eq!(
            fields(&p, "NodePrepareResourceResponse"),
            [f("devices", 1, M, true), f("error", 2, S, false)]
        );
        assert_eq!(
            fields(&p, "NodeUnprepareResourceResponse"),
            [f("error", 1, S, false)]
        );
        assert_eq!(
            fields(&p, "Device"),
            [
                f("request_names", 1, S, true),
                f("pool_name", 2, S, false),
                f("device_name", 3, S, false),
                f("cdi_device_ids", 4, S, true),
            ]
        );
        assert_eq!(
            fields(&p, "Claim"),
            [
                f("namespace", 1, S, false),
                f("uid", 2, S, false),
                f("name", 3, S, false),
            ]
        );
        let entry = &message(&p, "NodePrepareResourcesResponse").nested_type[0];
        assert!(
            entry.options.as_ref().unwrap().map_entry(),
            "claims is a map"
        );
        assert_eq!(entry.field[0].name(), "key");
        assert_eq!(entry.field[0].r#type(), S, "keyed by claim UID");
    }
}

#[test]
fn every_registration_field_number_is_kubelets() {
    use Type::{Bool as B, String as S};
    assert_eq!(
        fields("pluginregistration", "PluginInfo"),
        [
            f("type", 1, S, false),
            f("name", 2, S, false),
            f("endpoint", 3, S, false),
            f("supported_versions", 4, S, true),
        ]
    );
    assert_eq!(
        fields("pluginregistration", "RegistrationStatus"),
        [f("plugin_registered", 1, B, false), f("error", 2, S, false)]
    );
    assert!(fields("pluginregistration", "InfoRequest").is_empty());
    assert!(fields("pluginregistration", "RegistrationStatusResponse").is_empty());
}

/// The generated code writes the numbers the descriptors say (bytes as kubelet's Go code
/// writes them for the same values).
#[test]
fn the_generated_messages_encode_kubelets_bytes() {
    let claim = dra_v1::Claim {
        namespace: "a".into(),
        uid: "b".into(),
        name: "c".into(),
    };
    assert_eq!(
        claim.encode_to_vec(),
        [0x0a, 1, b'a', 0x12, 1, b'b', 0x1a, 1, b'c']
    );
    let device = dra_v1beta1::Device {
        request_names: vec!["r".into()],
        pool_name: "p".into(),
        device_name: "d".into(),
        cdi_device_ids: vec!["x".into()],
    };
    assert_eq!(
        device.encode_to_vec(),
        [0x0a, 1, b'r', 0x12, 1, b'p', 0x1a, 1, b'd', 0x22, 1, b'x']
    );
    let status = registration::RegistrationStatus {
        plugin_registered: true,
        error: "e".into(),
    };
    assert_eq!(status.encode_to_vec(), [0x08, 1, 0x12, 1, b'e']);
}
