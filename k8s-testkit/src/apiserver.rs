//! An API server stand-in: the few resources the DRA plugin reads and writes, served over
//! loopback HTTP/1.1 and reached through a kubeconfig, so kube's real client runs against it.
//!
//! It is strict where a real API server is and a mistake would otherwise only show on a
//! cluster: every body must survive decoding into its k8s-openapi type unchanged (an unknown
//! or misspelled field is a 400), and ResourceSlices are held to Kubernetes' validation (422).
//! It has no scheduler (a test posts claims with `status.allocation` already set), no watch,
//! no authentication, no admission, no garbage collection.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationResult, DeviceClaim, DeviceRequest,
    DeviceRequestAllocationResult, ExactDeviceRequest, ResourceClaim, ResourceClaimSpec,
    ResourceClaimStatus, ResourceSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::validation::{self, Cause};

/// The stand-in, serving on 127.0.0.1 from a thread of its own (with its own tokio runtime),
/// so it works the same from `#[tokio::test]` and from plain tests. Dropping it stops it.
#[derive(Debug)]
pub struct ApiServer {
    address: SocketAddr,
    store: Arc<Mutex<Store>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Starts on a free port. Panics if it cannot: a test cannot go on without it.
    pub fn start() -> ApiServer {
        match Self::bind(0) {
            Ok(server) => server,
            Err(e) => panic!("cannot start the API server stand-in: {e}"),
        }
    }

    /// Starts on 127.0.0.1:`port` (0: any free port).
    pub fn bind(port: u16) -> io::Result<ApiServer> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let listener = {
            // The listener registers with the runtime that will poll it.
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let store = Arc::new(Mutex::new(Store::default()));
        let (stop, stopped) = oneshot::channel();
        let serving = Arc::clone(&store);
        let thread = std::thread::Builder::new()
            .name("apiserver-standin".to_owned())
            .spawn(move || runtime.block_on(serve(listener, serving, stopped)))?;
        Ok(ApiServer {
            address,
            store,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// "http://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A kubeconfig pointing at the stand-in, without TLS or credentials (JSON, which is YAML).
    pub fn kubeconfig(&self) -> String {
        kubeconfig_for(&self.url())
    }

    /// Writes [`Self::kubeconfig`] to `path`. Panics if it cannot: the test cannot go on.
    pub fn write_kubeconfig(&self, path: &Path) {
        if let Err(e) = std::fs::write(path, self.kubeconfig()) {
            panic!("cannot write the kubeconfig {}: {e}", path.display());
        }
    }

    /// One HTTP request, for tests that need to send what kube's typed client never would
    /// (a misspelled field, a stale resourceVersion): the status code and the JSON answer.
    /// Blocking; the server answers from its own thread, so this is fine in async tests too.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        match exchange(self.address, method, path, body) {
            Ok(answer) => answer,
            Err(e) => panic!("{method} {path} to the stand-in failed: {e}"),
        }
    }

    /// Adds a node (test setup, not logged as a request) and returns its uid.
    pub fn add_node(&self, name: &str) -> String {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        match self.store().insert(None, node) {
            Ok((_, stored)) => stored.metadata.uid.unwrap_or_default(),
            Err(refusal) => panic!("the stand-in refused node {name}: {}", refusal.message),
        }
    }

    /// Adds a claim as it is, `status.allocation` and a given uid included (test setup, not
    /// logged as a request). Returns it as stored.
    pub fn add_claim(&self, claim: ResourceClaim) -> ResourceClaim {
        let namespace = claim.metadata.namespace.clone().unwrap_or_default();
        match self.store().insert(Some(&namespace), claim) {
            Ok((_, stored)) => stored,
            Err(refusal) => panic!("the stand-in refused the claim: {}", refusal.message),
        }
    }

    /// Removes a claim; whether there was one.
    pub fn remove_claim(&self, namespace: &str, name: &str) -> bool {
        let key = key::<ResourceClaim>(Some(namespace), name);
        self.store().objects.remove(&key).is_some()
    }

    /// Every ResourceSlice, by name.
    pub fn slices(&self) -> Vec<ResourceSlice> {
        self.store()
            .objects
            .iter()
            .filter(|(key, _)| key.0 == plural::<ResourceSlice>())
            .filter_map(|(_, object)| serde_json::from_value(object.clone()).ok())
            .collect()
    }

    /// Every HTTP request so far, oldest first: (method, path with its query, if any).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.store().requests.clone()
    }

    /// A claim allocated by a scheduler that does not exist here: one request, one device.
    pub fn allocated_claim(
        namespace: &str,
        name: &str,
        uid: &str,
        driver: &str,
        pool: &str,
        device: &str,
        request: &str,
    ) -> ResourceClaim {
        ResourceClaim {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_owned()),
                name: Some(name.to_owned()),
                uid: Some(uid.to_owned()),
                ..ObjectMeta::default()
            },
            spec: ResourceClaimSpec {
                devices: Some(DeviceClaim {
                    requests: Some(vec![DeviceRequest {
                        name: request.to_owned(),
                        exactly: Some(ExactDeviceRequest {
                            device_class_name: driver.to_owned(),
                            ..ExactDeviceRequest::default()
                        }),
                        ..DeviceRequest::default()
                    }]),
                    ..DeviceClaim::default()
                }),
            },
            status: Some(ResourceClaimStatus {
                allocation: Some(AllocationResult {
                    devices: Some(DeviceAllocationResult {
                        results: Some(vec![DeviceRequestAllocationResult {
                            request: request.to_owned(),
                            driver: driver.to_owned(),
                            pool: pool.to_owned(),
                            device: device.to_owned(),
                            ..DeviceRequestAllocationResult::default()
                        }]),
                        config: None,
                    }),
                    ..AllocationResult::default()
                }),
                ..ResourceClaimStatus::default()
            }),
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the server thread is gone already.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// HTTP/1.1 over a fresh connection, closed after the answer (which has a Content-Length).
fn exchange(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> io::Result<(u16, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, format!("{answer:?}"));
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(malformed)?;
    let value = serde_json::from_str(body).map_err(|_| malformed())?;
    Ok((code, value))
}

/// A poisoned lock only means a test panicked while holding it; the data is still usable.
fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<Mutex<Store>>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // A connection that failed before we got it (reset, fd limit): not ours to fix.
                Err(_) => continue,
            },
        };
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(Arc::clone(&store), request));
            // A client that hangs up mid-request is no failure of the server.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    store: Arc<Mutex<Store>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let body = request.into_body().collect().await?.to_bytes();

    let (code, value) = lock(&store).handle(&method, &path, &query, &body);

    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Where an object lives: (URL plural, namespace or "", name).
type Key = (&'static str, String, String);

fn key<K: Kind>(namespace: Option<&str>, name: &str) -> Key {
    (
        plural::<K>(),
        namespace.unwrap_or_default().to_owned(),
        name.to_owned(),
    )
}

fn plural<K: Kind>() -> &'static str {
    K::URL_PATH_SEGMENT
}

/// The objects, as k8s-openapi serializes them, and the request log.
#[derive(Debug, Default)]
struct Store {
    /// The last resourceVersion handed out; every write takes the next one.
    version: u64,
    /// The last uid number handed out.
    uids: u64,
    objects: BTreeMap<Key, Value>,
    requests: Vec<(String, String)>,
}

/// The HTTP status code and the JSON body of an answer.
type Answer = (u16, Value);

impl Store {
    fn handle(&mut self, method: &str, path: &str, query: &str, body: &[u8]) -> Answer {
        let logged = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query}")
        };
        self.requests.push((method.to_owned(), logged));

        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let answer = match segments.as_slice() {
            ["api", "v1", "nodes"] => self.collection::<Node>(method, None, query, body),
            ["api", "v1", "nodes", name] => self.item::<Node>(method, None, name, body),
            [
                "apis",
                "resource.k8s.io",
                "v1",
                "namespaces",
                ns,
                "resourceclaims",
            ] => self.collection::<ResourceClaim>(method, Some(ns), query, body),
            [
                "apis",
                "resource.k8s.io",
                "v1",
                "namespaces",
                ns,
                "resourceclaims",
                name,
            ] => self.item::<ResourceClaim>(method, Some(ns), name, body),
            ["apis", "resource.k8s.io", "v1", "resourceslices"] => {
                self.collection::<ResourceSlice>(method, None, query, body)
            }
            ["apis", "resource.k8s.io", "v1", "resourceslices", name] => {
                self.item::<ResourceSlice>(method, None, name, body)
            }
            _ => Err(Refusal::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        };
        answer.unwrap_or_else(|refusal| (refusal.code, refusal.to_status()))
    }

    fn collection<K: Kind>(
        &mut self,
        method: &str,
        namespace: Option<&str>,
        query: &str,
        body: &[u8],
    ) -> Result<Answer, Refusal> {
        match method {
            "GET" => self.list::<K>(namespace, query),
            "POST" => {
                let object = decode::<K>(body)?;
                let (code, stored) = self.insert(namespace, object)?;
                Ok((code, to_value(&stored)))
            }
            _ => Err(Refusal::method_not_allowed(method)),
        }
    }

    fn item<K: Kind>(
        &mut self,
        method: &str,
        namespace: Option<&str>,
        name: &str,
        body: &[u8],
    ) -> Result<Answer, Refusal> {
        let key = key::<K>(namespace, name);
        match method {
            "GET" => match self.objects.get(&key) {
                Some(object) => Ok((200, object.clone())),
                None => Err(Refusal::not_found::<K>(name)),
            },
            "PUT" => self.replace::<K>(key, decode::<K>(body)?),
            "DELETE" => self.delete::<K>(key, body),
            _ => Err(Refusal::method_not_allowed(method)),
        }
    }

    /// Create: validate, then fill in what the server owns (uid, resourceVersion,
    /// creationTimestamp, generation).
    fn insert<K: Kind>(
        &mut self,
        namespace: Option<&str>,
        mut object: K,
    ) -> Result<(u16, K), Refusal> {
        let meta = object.metadata_mut();
        match (namespace, meta.namespace.as_deref()) {
            (Some(url), Some(sent)) if !sent.is_empty() && sent != url => {
                return Err(Refusal::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(url), _) => meta.namespace = Some(url.to_owned()),
            // Cluster-scoped objects have no namespace; a real server drops one that is sent.
            (None, _) => meta.namespace = None,
        }
        let name = meta.name.clone().unwrap_or_default();
        let mut causes = validation::object_name(meta.name.as_deref());
        causes.extend(object.validate());
        if !causes.is_empty() {
            return Err(Refusal::invalid::<K>(&name, causes));
        }
        let key = key::<K>(namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(Refusal::new(
                409,
                "AlreadyExists",
                format!("{} {name:?} already exists", qualified::<K>()),
            )
            .about::<K>(&name));
        }

        let uid = self.next_uid();
        let version = self.next_version();
        let meta = object.metadata_mut();
        if !(K::KEEPS_SENT_UID && meta.uid.is_some()) {
            meta.uid = Some(uid);
        }
        meta.resource_version = Some(version);
        meta.generation = Some(1);
        meta.creation_timestamp = Some(now());
        self.objects.insert(key, to_value(&object));
        Ok((201, object))
    }

    /// Replace (PUT): the sent resourceVersion, if any, must be the stored one.
    fn replace<K: Kind>(&mut self, key: Key, mut object: K) -> Result<Answer, Refusal> {
        let name = key.2.clone();
        let meta = object.metadata_mut();
        if meta.name.as_deref() != Some(name.as_str()) {
            return Err(Refusal::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta.name.as_deref().unwrap_or_default()
            )));
        }
        let Some(stored) = self.objects.get(&key) else {
            return Err(Refusal::not_found::<K>(&name));
        };
        let old: K = serde_json::from_value(stored.clone())
            .map_err(|e| Refusal::new(500, "InternalError", e.to_string()))?;
        let old_meta = old.metadata();
        let conflict = || {
            Refusal::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                    qualified::<K>()
                ),
            )
            .about::<K>(&name)
        };
        if meta
            .resource_version
            .as_ref()
            .is_some_and(|sent| Some(sent) != old_meta.resource_version.as_ref())
        {
            return Err(conflict());
        }
        if meta
            .uid
            .as_ref()
            .is_some_and(|sent| Some(sent) != old_meta.uid.as_ref())
        {
            return Err(conflict());
        }
        meta.namespace = old_meta.namespace.clone();

        let mut causes = validation::object_name(Some(&name));
        causes.extend(object.validate());
        causes.extend(K::validate_update(&old, &object));
        if !causes.is_empty() {
            return Err(Refusal::invalid::<K>(&name, causes));
        }

        let changed = without_metadata(&to_value(&object)) != without_metadata(stored);
        let version = self.next_version();
        let meta = object.metadata_mut();
        meta.uid = old_meta.uid.clone();
        meta.creation_timestamp = old_meta.creation_timestamp.clone();
        meta.generation = Some(old_meta.generation.unwrap_or(1) + i64::from(changed));
        meta.resource_version = Some(version);
        let value = to_value(&object);
        self.objects.insert(key, value.clone());
        Ok((200, value))
    }

    /// Delete: answers with the object as it was; honours DeleteOptions' preconditions.
    fn delete<K: Kind>(&mut self, key: Key, body: &[u8]) -> Result<Answer, Refusal> {
        let name = key.2.clone();
        let Some(stored) = self.objects.get(&key) else {
            return Err(Refusal::not_found::<K>(&name));
        };
        if !body.is_empty() {
            let options = decode::<DeleteOptions>(body)?;
            let precondition = options.preconditions.unwrap_or_default();
            let differs = |sent: Option<String>, field: &str| {
                sent.is_some_and(|sent| stored["metadata"][field].as_str() != Some(&sent))
            };
            if differs(precondition.uid, "uid")
                || differs(precondition.resource_version, "resourceVersion")
            {
                return Err(Refusal::new(
                    409,
                    "Conflict",
                    format!(
                        "Precondition failed for {} {name:?}: uid or resourceVersion differ",
                        qualified::<K>()
                    ),
                )
                .about::<K>(&name));
            }
        }
        self.next_version();
        let removed = self.objects.remove(&key).unwrap_or_default();
        Ok((200, removed))
    }

    /// A List object of one kind, filtered by fieldSelector and labelSelector.
    fn list<K: Kind>(&self, namespace: Option<&str>, query: &str) -> Result<Answer, Refusal> {
        let mut fields = Vec::new();
        let mut labels = Vec::new();
        for (name, value) in query_pairs(query) {
            match name.as_str() {
                "fieldSelector" => fields = parse_selector(&value, false)?,
                "labelSelector" => labels = parse_selector(&value, true)?,
                // limit, resourceVersion, timeoutSeconds...: one page, from now, always.
                _ => {}
            }
        }
        if let Some(unsupported) = fields.iter().find(|r| !K::FIELDS.contains(&r.key())) {
            return Err(Refusal::bad_request(format!(
                "field label not supported: {}",
                unsupported.key()
            )));
        }

        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(key, _)| key.0 == plural::<K>())
            .filter(|(key, _)| namespace.is_none_or(|ns| key.1 == ns))
            .map(|(_, object)| object)
            .filter(|object| {
                fields.iter().all(|r| {
                    let pointer = format!("/{}", r.key().replace('.', "/"));
                    r.matches(Some(
                        object
                            .pointer(&pointer)
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    ))
                })
            })
            .filter(|object| {
                labels
                    .iter()
                    .all(|r| r.matches(object["metadata"]["labels"][r.key()].as_str()))
            })
            .cloned()
            .collect();
        Ok((
            200,
            json!({
                "kind": K::LIST_KIND,
                "apiVersion": K::API_VERSION,
                "metadata": {"resourceVersion": self.version.to_string()},
                "items": items,
            }),
        ))
    }

    fn next_version(&mut self) -> String {
        self.version += 1;
        self.version.to_string()
    }

    fn next_uid(&mut self) -> String {
        self.uids += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.uids)
    }
}

/// What the stand-in needs of a kind beyond k8s-openapi's traits.
trait Kind:
    k8s_openapi::ListableResource
    + k8s_openapi::Metadata<Ty = ObjectMeta>
    + Serialize
    + DeserializeOwned
{
    /// The field labels a list's fieldSelector may use.
    const FIELDS: &'static [&'static str] = &["metadata.name"];
    /// Whether a uid sent on create is kept. A real server always assigns one; tests set up
    /// claims and nodes with known uids, as kubelet passes the claim's uid along.
    const KEEPS_SENT_UID: bool = true;

    fn validate(&self) -> Vec<Cause> {
        Vec::new()
    }
    fn validate_update(_old: &Self, _new: &Self) -> Vec<Cause> {
        Vec::new()
    }
}

impl Kind for Node {}

impl Kind for ResourceClaim {
    const FIELDS: &'static [&'static str] = &["metadata.name", "metadata.namespace"];
}

impl Kind for ResourceSlice {
    const FIELDS: &'static [&'static str] = &[
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.driver",
    ];
    const KEEPS_SENT_UID: bool = false;

    fn validate(&self) -> Vec<Cause> {
        validation::resource_slice(self)
    }
    fn validate_update(old: &Self, new: &Self) -> Vec<Cause> {
        validation::resource_slice_update(old, new)
    }
}

/// "resourceslices.resource.k8s.io", or "nodes" for the core group, as error messages say it.
fn qualified<K: Kind>() -> String {
    if K::GROUP.is_empty() {
        plural::<K>().to_owned()
    } else {
        format!("{}.{}", plural::<K>(), K::GROUP)
    }
}

/// A request body as `T`, refused with 400 unless it is JSON that decodes into `T` and encodes
/// back to the same JSON: a field `T` does not know would otherwise vanish without a word, where
/// a real API server (strict field validation) refuses it.
fn decode<T: Serialize + DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    let sent: Value = serde_json::from_slice(body)
        .map_err(|e| Refusal::bad_request(format!("the request body is not JSON: {e}")))?;
    let object = T::deserialize(&sent)
        .map_err(|e| Refusal::bad_request(format!("the request body does not decode: {e}")))?;
    match lost(&sent, &to_value(&object), "") {
        None => Ok(object),
        Some(Loss::Unknown(field)) => Err(Refusal::bad_request(format!(
            "strict decoding error: unknown field {field:?}"
        ))),
        Some(Loss::Changed(field)) => Err(Refusal::bad_request(format!(
            "strict decoding error: field {field:?} does not keep its value when decoded"
        ))),
    }
}

/// What a JSON round trip dropped or altered, by its path ("spec.devices[0].attributes.x").
#[derive(Debug, PartialEq, Eq)]
enum Loss {
    Unknown(String),
    Changed(String),
}

fn lost(sent: &Value, back: &Value, path: &str) -> Option<Loss> {
    match (sent, back) {
        (Value::Object(sent), Value::Object(back)) => sent
            .iter()
            // null means "not set" to a real server as well.
            .filter(|(_, value)| !value.is_null())
            .find_map(|(name, value)| {
                let path = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                match back.get(name) {
                    None => Some(Loss::Unknown(path)),
                    Some(back) => lost(value, back, &path),
                }
            }),
        (Value::Array(sent), Value::Array(back)) if sent.len() == back.len() => sent
            .iter()
            .zip(back)
            .enumerate()
            .find_map(|(i, (sent, back))| lost(sent, back, &format!("{path}[{i}]"))),
        (sent, back) => (sent != back).then(|| Loss::Changed(path.to_owned())),
    }
}

/// The object without `metadata` and `status`: what a change of counts toward `generation`.
fn without_metadata(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    object
}

fn to_value<T: Serialize>(object: &T) -> Value {
    // k8s-openapi types always serialize; Null would show up in a test as an obvious failure.
    serde_json::to_value(object).unwrap_or_default()
}

/// Now, to the second, as Kubernetes timestamps are.
fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// One requirement of a field or label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equal(String, String),
    NotEqual(String, String),
    Exists(String),
    Absent(String),
}

impl Requirement {
    fn key(&self) -> &str {
        match self {
            Self::Equal(key, _)
            | Self::NotEqual(key, _)
            | Self::Exists(key)
            | Self::Absent(key) => key,
        }
    }

    /// Whether an object whose value for the key is `value` (None: no such label) matches.
    fn matches(&self, value: Option<&str>) -> bool {
        match self {
            Self::Equal(_, wanted) => value == Some(wanted.as_str()),
            Self::NotEqual(_, unwanted) => value != Some(unwanted.as_str()),
            Self::Exists(_) => value.is_some(),
            Self::Absent(_) => value.is_none(),
        }
    }
}

/// "a=b,c!=d" (and for labels also "e" and "!f"). Set-based forms ("in", "notin") are refused
/// with 400: the plugin does not use them, and silently ignoring one would match too much.
fn parse_selector(text: &str, labels: bool) -> Result<Vec<Requirement>, Refusal> {
    let unsupported = |term: &str| {
        Refusal::bad_request(format!(
            "unable to parse requirement {term:?}: the stand-in supports =, ==, != (and, for labels, key and !key)"
        ))
    };
    let mut requirements = Vec::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if term.contains(['(', ')', ' ', '<', '>']) {
            return Err(unsupported(term));
        }
        let pair = |(key, value): (&str, &str)| (key.to_owned(), value.to_owned());
        let requirement = if let Some((key, value)) = term.split_once("!=").map(pair) {
            Requirement::NotEqual(key, value)
        } else if let Some((key, value)) = term.split_once("==").map(pair) {
            Requirement::Equal(key, value)
        } else if let Some((key, value)) = term.split_once('=').map(pair) {
            Requirement::Equal(key, value)
        } else if !labels {
            return Err(unsupported(term));
        } else if let Some(key) = term.strip_prefix('!') {
            Requirement::Absent(key.to_owned())
        } else {
            Requirement::Exists(term.to_owned())
        };
        if requirement.key().is_empty() {
            return Err(unsupported(term));
        }
        requirements.push(requirement);
    }
    Ok(requirements)
}

/// The name=value pairs of a URL query, percent-decoded.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A failed request, answered with a metav1.Status.
#[derive(Debug)]
struct Refusal {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl Refusal {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow method {method} on this resource"),
        )
    }

    fn not_found<K: Kind>(name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", qualified::<K>()),
        )
        .about::<K>(name)
    }

    /// 422, as for a create or update that validation refused.
    fn invalid<K: Kind>(name: &str, causes: Vec<Cause>) -> Self {
        let listed: Vec<String> = causes.iter().map(Cause::describe).collect();
        let mut refusal = Self::new(
            422,
            "Invalid",
            format!(
                "{} {name:?} is invalid: [{}]",
                [K::KIND, K::GROUP].join(".").trim_end_matches('.'),
                listed.join(", ")
            ),
        )
        .about::<K>(name);
        if let Some(details) = &mut refusal.details {
            details["causes"] = causes
                .iter()
                .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                .collect();
        }
        refusal
    }

    /// Names the object in `details`, as a real server does.
    fn about<K: Kind>(mut self, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": K::GROUP, "kind": plural::<K>()}));
        self
    }

    fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// A kubeconfig naming `url` as its cluster, with no credentials (the stand-in needs none).
pub fn kubeconfig_for(url: &str) -> String {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {"server": url}}],
        "users": [{"name": "standin", "user": {}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
        "current-context": "standin",
    });
    format!("{config:#}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_names_the_unknown_field() {
        let body = br#"{"metadata":{"name":"n","labelz":{}},"spec":{}}"#;
        let refusal = decode::<Node>(body).err().map(|r| (r.code, r.message));
        assert_eq!(
            refusal,
            Some((
                400,
                "strict decoding error: unknown field \"metadata.labelz\"".to_owned()
            ))
        );
        // null is "not set", and kind/apiVersion may be left out.
        assert!(decode::<Node>(br#"{"metadata":{"name":"n","labels":null}}"#).is_ok());
    }

    #[test]
    fn selectors() {
        let parsed = parse_selector("spec.nodeName=a,spec.driver==b,x!=c", false);
        assert_eq!(
            parsed.ok(),
            Some(vec![
                Requirement::Equal("spec.nodeName".into(), "a".into()),
                Requirement::Equal("spec.driver".into(), "b".into()),
                Requirement::NotEqual("x".into(), "c".into()),
            ])
        );
        assert!(parse_selector("app in (a,b)", true).is_err());
        assert!(parse_selector("spec.nodeName", false).is_err());
        assert_eq!(
            parse_selector("!gone,here", true).ok(),
            Some(vec![
                Requirement::Absent("gone".into()),
                Requirement::Exists("here".into())
            ])
        );
    }

    #[test]
    fn queries_are_percent_decoded() {
        assert_eq!(
            query_pairs("fieldSelector=spec.nodeName%3Dn1%2Cspec.driver%3Dd&limit=5"),
            vec![
                (
                    "fieldSelector".to_owned(),
                    "spec.nodeName=n1,spec.driver=d".to_owned()
                ),
                ("limit".to_owned(), "5".to_owned()),
            ]
        );
    }
}
