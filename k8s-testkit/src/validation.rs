//! The checks a real API server makes on what the plugin writes, where getting one wrong would
//! otherwise only show on a real cluster: object and device names, and ResourceSlice limits
//! (k8s.io/kubernetes pkg/apis/resource/validation, Kubernetes 1.34).
//!
//! Not checked: version attributes being semver, capacity quantities, shared counters, taints,
//! node selector terms. The plugin writes none of those.

use std::collections::BTreeSet;

use k8s_openapi::api::resource::v1::{Device, DeviceAttribute, ResourceSlice};

/// At most this many devices in one slice.
const MAX_DEVICES: usize = 128;
/// At most this many attributes and capacities, together, on one device.
const MAX_ATTRIBUTES: usize = 32;
/// At most this long: a string or version attribute value.
const MAX_VALUE: usize = 64;
/// At most this long: a driver name (a DNS subdomain, shorter than most).
const MAX_DRIVER: usize = 63;
/// At most this long: the C identifier of an attribute name, and its domain.
const MAX_ATTRIBUTE_ID: usize = 32;
const MAX_ATTRIBUTE_DOMAIN: usize = 63;
/// At most this long: a DNS subdomain, a pool name.
const MAX_SUBDOMAIN: usize = 253;
/// At most this long: a DNS label.
const MAX_LABEL: usize = 63;

/// One thing wrong with an object, as metav1.StatusCause names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cause {
    /// FieldValueInvalid, FieldValueRequired, FieldValueTooMany, ...
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl Cause {
    fn new(reason: &'static str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            reason,
            field: field.into(),
            message: message.into(),
        }
    }
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new("FieldValueInvalid", field, message)
    }
    pub(crate) fn required(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new("FieldValueRequired", field, message)
    }
    fn too_many(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new("FieldValueTooMany", field, message)
    }
    fn too_long(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new("FieldValueTooLong", field, message)
    }
    fn duplicate(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new("FieldValueDuplicate", field, message)
    }
    fn forbidden(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new("FieldValueForbidden", field, message)
    }

    /// "spec.devices: Too many: 129: must have at most 128 items", as Kubernetes words it.
    pub(crate) fn describe(&self) -> String {
        let kind = match self.reason {
            "FieldValueRequired" => "Required value",
            "FieldValueTooMany" => "Too many",
            "FieldValueTooLong" => "Too long",
            "FieldValueDuplicate" => "Duplicate value",
            "FieldValueForbidden" => "Forbidden",
            _ => "Invalid value",
        };
        format!("{}: {kind}: {}", self.field, self.message)
    }
}

/// Why `value` is not a DNS label (RFC 1123: at most 63 of [a-z0-9-], alphanumeric at both
/// ends), or None when it is one.
pub(crate) fn not_dns_label(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if value.len() > MAX_LABEL {
        Some(format!("must be no more than {MAX_LABEL} characters"))
    } else if bytes.is_empty()
        || !bytes.iter().all(|b| alnum(b) || *b == b'-')
        || !bytes.first().is_some_and(alnum)
        || !bytes.last().is_some_and(alnum)
    {
        Some(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
             '-', and must start and end with an alphanumeric character"
                .to_owned(),
        )
    } else {
        None
    }
}

/// Why `value` is not a DNS subdomain (dot-separated labels, at most 253 characters; Kubernetes
/// does not hold each part to 63), or None when it is one.
pub(crate) fn not_dns_subdomain(value: &str) -> Option<String> {
    if value.len() > MAX_SUBDOMAIN {
        return Some(format!("must be no more than {MAX_SUBDOMAIN} characters"));
    }
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let part_ok = |part: &str| {
        part.chars().all(|c| alnum(c) || c == '-')
            && part.starts_with(alnum)
            && part.ends_with(alnum)
    };
    if value.split('.').all(part_ok) {
        None
    } else {
        Some(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character"
                .to_owned(),
        )
    }
}

/// metadata.name of any object the stand-in stores: required, a DNS subdomain.
pub(crate) fn object_name(name: Option<&str>) -> Vec<Cause> {
    match name {
        None | Some("") => vec![Cause::required(
            "metadata.name",
            "name or generateName is required",
        )],
        Some(name) => not_dns_subdomain(name)
            .map(|why| Cause::invalid("metadata.name", format!("{name:?}: {why}")))
            .into_iter()
            .collect(),
    }
}

/// A ResourceSlice as the API server validates it on create and update.
pub(crate) fn resource_slice(slice: &ResourceSlice) -> Vec<Cause> {
    let spec = &slice.spec;
    let mut causes = Vec::new();

    // The driver: a DNS subdomain (compared lowercased, as Kubernetes does), at most 63.
    if spec.driver.is_empty() {
        causes.push(Cause::required("spec.driver", "driver name is required"));
    } else if spec.driver.len() > MAX_DRIVER {
        causes.push(Cause::too_long(
            "spec.driver",
            format!("may not be more than {MAX_DRIVER} bytes"),
        ));
    } else if let Some(why) = not_dns_subdomain(&spec.driver.to_lowercase()) {
        causes.push(Cause::invalid("spec.driver", why));
    }

    // The pool: a name of slash-separated DNS subdomains, a generation, a positive count.
    let pool = &spec.pool;
    if pool.name.is_empty() {
        causes.push(Cause::required("spec.pool.name", "pool name is required"));
    } else if pool.name.len() > MAX_SUBDOMAIN {
        causes.push(Cause::too_long(
            "spec.pool.name",
            format!("may not be more than {MAX_SUBDOMAIN} bytes"),
        ));
    } else if let Some(why) = pool.name.split('/').find_map(not_dns_subdomain) {
        causes.push(Cause::invalid("spec.pool.name", why));
    }
    if pool.generation < 0 {
        causes.push(Cause::invalid(
            "spec.pool.generation",
            "must be greater than or equal to 0",
        ));
    }
    if pool.resource_slice_count <= 0 {
        causes.push(Cause::invalid(
            "spec.pool.resourceSliceCount",
            "must be greater than 0",
        ));
    }

    // Where the devices are: exactly one of the four ways.
    let node_name = spec.node_name.as_deref().filter(|name| !name.is_empty());
    let per_device = spec.per_device_node_selection == Some(true);
    let ways = [
        node_name.is_some(),
        spec.node_selector.is_some(),
        spec.all_nodes == Some(true),
        per_device,
    ];
    match ways.iter().filter(|set| **set).count() {
        0 => causes.push(Cause::required(
            "spec",
            "exactly one of `nodeName`, `nodeSelector`, `allNodes`, `perDeviceNodeSelection` is required",
        )),
        1 => {}
        _ => causes.push(Cause::invalid(
            "spec",
            "exactly one of `nodeName`, `nodeSelector`, `allNodes`, `perDeviceNodeSelection` is required, but multiple fields are set",
        )),
    }
    if let Some(why) = node_name.and_then(not_dns_subdomain) {
        causes.push(Cause::invalid("spec.nodeName", why));
    }

    let devices = spec.devices.as_deref().unwrap_or_default();
    if devices.len() > MAX_DEVICES {
        causes.push(Cause::too_many(
            "spec.devices",
            format!("{}: must have at most {MAX_DEVICES} items", devices.len()),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, device) in devices.iter().enumerate() {
        let field = format!("spec.devices[{i}]");
        if !names.insert(device.name.as_str()) {
            causes.push(Cause::duplicate(
                format!("{field}.name"),
                format!("{:?}", device.name),
            ));
        }
        causes.extend(device_causes(&field, device, per_device));
    }
    causes
}

/// One device: its name, its attributes and capacities, and its own node selection.
fn device_causes(field: &str, device: &Device, per_device: bool) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Some(why) = not_dns_label(&device.name) {
        causes.push(Cause::invalid(
            format!("{field}.name"),
            format!("{:?}: {why}", device.name),
        ));
    }

    let attributes = device.attributes.as_ref();
    let capacities = device.capacity.as_ref().map_or(0, |c| c.len());
    let total = attributes.map_or(0, |a| a.len()) + capacities;
    if total > MAX_ATTRIBUTES {
        causes.push(Cause::too_many(
            field,
            format!("{total}: the total number of attributes and capacities must not exceed {MAX_ATTRIBUTES}"),
        ));
    }
    for (name, value) in attributes.into_iter().flatten() {
        let at = format!("{field}.attributes[{name}]");
        if let Some(why) = not_qualified_name(name) {
            causes.push(Cause::invalid(at.clone(), why));
        }
        causes.extend(attribute_causes(&at, value));
    }

    // With perDeviceNodeSelection each device says where it is; without, none may.
    let ways = [
        device.node_name.as_deref().is_some_and(|n| !n.is_empty()),
        device.node_selector.is_some(),
        device.all_nodes == Some(true),
    ];
    let set = ways.iter().filter(|set| **set).count();
    if per_device && set != 1 {
        causes.push(Cause::invalid(
            field,
            "exactly one of `nodeName`, `nodeSelector`, `allNodes` is required when `perDeviceNodeSelection` is set to true in the ResourceSlice spec",
        ));
    } else if !per_device && set != 0 {
        causes.push(Cause::forbidden(
            field,
            "`nodeName`, `nodeSelector`, `allNodes` can only be set if `perDeviceNodeSelection` is set to true in the ResourceSlice spec",
        ));
    }
    causes
}

/// An attribute value: exactly one of bool, int, string, version; strings at most 64.
fn attribute_causes(at: &str, value: &DeviceAttribute) -> Vec<Cause> {
    let kinds = [
        value.bool.is_some(),
        value.int.is_some(),
        value.string.is_some(),
        value.version.is_some(),
    ];
    let mut causes = Vec::new();
    match kinds.iter().filter(|set| **set).count() {
        0 => causes.push(Cause::required(at, "exactly one value must be specified")),
        1 => {}
        _ => causes.push(Cause::invalid(at, "exactly one value must be specified")),
    }
    for (kind, text) in [("string", &value.string), ("version", &value.version)] {
        if let Some(text) = text.as_deref().filter(|t| t.len() > MAX_VALUE) {
            causes.push(Cause::too_long(
                format!("{at}.{kind}"),
                format!(
                    "{} bytes: may not be more than {MAX_VALUE} bytes",
                    text.len()
                ),
            ));
        }
    }
    causes
}

/// An attribute name: a C identifier of at most 32, optionally after "<DNS subdomain>/".
fn not_qualified_name(name: &str) -> Option<String> {
    let (domain, id) = match name.split_once('/') {
        Some((domain, id)) => (Some(domain), id),
        None => (None, name),
    };
    if let Some(domain) = domain {
        if domain.len() > MAX_ATTRIBUTE_DOMAIN {
            return Some(format!(
                "the domain may not be more than {MAX_ATTRIBUTE_DOMAIN} bytes"
            ));
        }
        if let Some(why) = not_dns_subdomain(domain) {
            return Some(format!("the domain: {why}"));
        }
    }
    let c_identifier = id.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !c_identifier {
        Some(format!("{id:?} is not a C identifier"))
    } else if id.len() > MAX_ATTRIBUTE_ID {
        Some(format!("may not be more than {MAX_ATTRIBUTE_ID} bytes"))
    } else {
        None
    }
}

/// What a slice may not change once created: its driver, node and pool name.
pub(crate) fn resource_slice_update(old: &ResourceSlice, new: &ResourceSlice) -> Vec<Cause> {
    let immutable = |field: &str| Cause::invalid(field, "field is immutable");
    let mut causes = Vec::new();
    if old.spec.driver != new.spec.driver {
        causes.push(immutable("spec.driver"));
    }
    if old.spec.node_name != new.spec.node_name {
        causes.push(immutable("spec.nodeName"));
    }
    if old.spec.pool.name != new.spec.pool.name {
        causes.push(immutable("spec.pool.name"));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        assert!(not_dns_label("pci-0000-01-10-0").is_none());
        assert!(not_dns_label("Pci").is_some());
        assert!(not_dns_label("-a").is_some());
        assert!(not_dns_label(&"a".repeat(64)).is_some());
        assert!(not_dns_subdomain("node-1.example.com").is_none());
        // Kubernetes holds the whole to 253, not each part to 63.
        assert!(not_dns_subdomain(&"a".repeat(100)).is_none());
        assert!(not_dns_subdomain("a..b").is_some());
        assert!(not_dns_subdomain("a_b").is_some());
        assert!(not_dns_subdomain(&"a".repeat(254)).is_some());
    }

    #[test]
    fn attribute_names() {
        assert!(not_qualified_name("resource.kubernetes.io/pciBusID").is_none());
        assert!(not_qualified_name("iommuGroup").is_none());
        assert!(not_qualified_name("1st").is_some());
        assert!(not_qualified_name("Bad_Domain/x").is_some());
        assert!(not_qualified_name(&"x".repeat(33)).is_some());
    }
}
