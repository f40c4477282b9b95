// SPDX-License-Identifier: MIT OR Apache-2.0
//! The varlink transport (`io.reapd.Reaper`, plus the `org.varlink.service`
//! introspection methods). A thin adapter like [`crate::transport::grpc`]: decode the
//! call, call the engine, encode. No decision is made here.
//!
//! The protocol layer is written here rather than taken from a crate (see
//! docs/varlink.md): `zlink` 0.8 serves one call at a time across all
//! connections and closes a connection on an unknown method, and the
//! `varlink` crate has no peer-credential or fd-passing API. What we need is
//! small: NUL-terminated JSON objects, one task per connection, the peer
//! identified at accept by [`listener::accept_loop`], and SCM_RIGHTS on
//! receive so a client can name its target by a pidfd.
//!
//! Per connection, calls are answered in order (varlink has no call ids);
//! different connections run in parallel, each call's blocking work on the
//! engine's blocking pool.
//!
//! Received fds are untrusted and stay bound to the bytes of the message
//! they came with. The receive path peeks at the socket (which installs no
//! fd, and says whether fds are attached), finds the end of the next
//! message, parses it, and only then reads exactly that message's bytes.
//! The kernel attaches the fds of a `sendmsg` to its first byte and never
//! returns bytes past an fd-carrying write in one read, so a read that ends
//! at this message's NUL gets the fds that were sent with this message and
//! no other's. The kernel is never asked to drop a passed fd: dropping one
//! releases it on the reading thread, and a release can block (a lingering
//! TCP socket waits in `tcp_close`), so a read of fd-carrying bytes has room
//! for all of them, and the fds its call does not name ([`FD_PARAMS`]) go
//! to a closer thread; a socket whose queue still holds fds is closed on a
//! closer thread too ([`listener::close_socket`]). An installed fd is kept
//! only if it is a pidfd (or, for `pidns`, a pid namespace); every other
//! one, and every one the call did not take, is closed by
//! [`crate::transport::closer`], charged to the sender's uid.

use std::future::Future;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use reapd_proto::model::{self, ApiError};
use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::engine::caller::Caller;
use crate::engine::candidates::{self, SortKey};
use crate::engine::error::EngineError;
use crate::engine::group::GroupSpec;
use crate::engine::target::TargetSpec;
use crate::engine::{Engine, GroupKillRequest, KillRequest};
use crate::transport::closer::{self, Closer, Received, SCM_MAX_FD};
use crate::transport::listener::{self, AcceptConfig, Accepted, ConnectionCounter};

/// The interface this broker implements.
pub const INTERFACE: &str = "io.reapd.Reaper";
/// The introspection interface every varlink service implements.
pub const SERVICE_INTERFACE: &str = "org.varlink.service";

/// The `org.varlink.service` IDL, as the varlink specification gives it.
pub const SERVICE_DESCRIPTION: &str = "\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
";

/// Largest message the broker reads. Real calls are a few hundred bytes; a
/// larger one gets an `InvalidMessage` reply and the connection is closed.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Parameters whose value is the index of an fd passed with the call. A
/// call takes exactly the fds these name; others are closed off the
/// executor, charged to the sender. Each
/// is taken with a verifier ([`MessageFds::take_pidfd`],
/// [`MessageFds::take_pid_namespace`]): an fd that fails it goes to the
/// closer, never back to the caller of `take_*`.
pub const FD_PARAMS: &[&str] = &["pidfd", "pidns"];

/// Most fds one message may bring: the highest index a call may name, plus
/// one. A connection's fd budget counts this many besides its socket.
pub const MAX_FDS_PER_CALL: usize = 4;

/// Fds one varlink connection may hold at once: its socket, the caller's
/// pidfd (SO_PEERPIDFD), and the fds of the message being received.
pub const FDS_PER_CONNECTION: usize = 2 + MAX_FDS_PER_CALL;

/// How long shutdown waits for calls in flight before giving up on them.
/// Below the unit's `TimeoutStopSec=` (20 s), and above the longest call
/// (a kill with the longest wait for exit, 10 s, plus its reap).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(12);

/// A varlink error reply: its fully qualified name and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct VarlinkError {
    pub name: &'static str,
    pub parameters: Value,
}

impl VarlinkError {
    fn new(name: &'static str, parameters: Value) -> Self {
        VarlinkError { name, parameters }
    }

    pub fn invalid_parameter(parameter: &str) -> Self {
        VarlinkError::new(
            "org.varlink.service.InvalidParameter",
            json!({ "parameter": parameter }),
        )
    }

    fn invalid_message(reason: impl Into<String>) -> Self {
        VarlinkError::new("io.reapd.Reaper.InvalidMessage", json!({ "reason": reason.into() }))
    }
}

/// The one encoding of engine errors for varlink: the API's error model
/// (`reapd_proto::model::ApiError`) as an error reply. The parameter an
/// `InvalidParameter` blames is the one the engine named.
pub fn error_of(err: EngineError) -> VarlinkError {
    let api = ApiError::from(&err);
    VarlinkError::new(api.varlink_name(), api.varlink_parameters())
}

/// A reply's parameters, encoded: the model's serde encoding (the IDL's
/// names), written straight to JSON text. Not through a `serde_json::Value`
/// tree, whose building, writing and dropping were a third of a
/// CheckPermission's instructions.
fn reply(value: impl serde::Serialize) -> Result<Box<RawValue>, VarlinkError> {
    serde_json::value::to_raw_value(&value)
        .map_err(|err| error_of(EngineError::Internal(format!("encoding a reply: {err}"))))
}

/// One decoded call.
#[derive(Debug)]
struct Call {
    method: String,
    parameters: Map<String, Value>,
    oneway: bool,
    more: bool,
}

/// A JSON value read without losing a duplicate key. serde_json's `Value`
/// keeps the last of two equal keys, so `{"pid":1,"pid":2}` would name pid
/// 2 to the broker and pid 1 to whatever else reads the message first-wins
/// (a log, a filter, a proxy in front of the socket): a call is refused
/// instead. `duplicate` is the path to the first repeated key, innermost key
/// first (the top-level key last).
struct Unique {
    value: Value,
    duplicate: Option<Vec<String>>,
}

/// Most JSON values (objects, arrays and scalars, at any depth) one message
/// may hold. A real call has a dozen; a message of thousands of keys costs
/// milliseconds of a runtime worker to parse (and other callers wait), so
/// parsing stops here.
pub const MAX_VALUES: usize = 256;

/// Reads a [`Unique`], counting values in a budget shared by the message.
struct UniqueSeed<'a>(&'a std::cell::Cell<usize>);

impl<'de> serde::de::DeserializeSeed<'de> for UniqueSeed<'_> {
    type Value = Unique;
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Unique, D::Error> {
        deserializer.deserialize_any(UniqueVisitor(self.0))
    }
}

struct UniqueVisitor<'a>(&'a std::cell::Cell<usize>);

impl UniqueVisitor<'_> {
    /// Charges one value to the message's budget.
    fn count<E: serde::de::Error>(&self) -> Result<(), E> {
        let n = self.0.get() + 1;
        self.0.set(n);
        if n > MAX_VALUES {
            return Err(E::custom(format_args!("more than {MAX_VALUES} values in one message")));
        }
        Ok(())
    }

    fn plain<E: serde::de::Error>(&self, value: Value) -> Result<Unique, E> {
        self.count()?;
        Ok(Unique { value, duplicate: None })
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueVisitor<'_> {
    type Value = Unique;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Unique, E> {
        self.plain(Value::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Unique, E> {
        self.plain(Value::from(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Unique, E> {
        self.plain(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Unique, E> {
        // As serde_json's own `Value` (JSON has no NaN or infinity).
        self.plain(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Unique, E> {
        self.plain(Value::String(v.to_string()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Unique, E> {
        self.plain(Value::String(v))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Unique, E> {
        self.plain(Value::Null)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Unique, E> {
        self.plain(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Unique, D::Error> {
        serde::de::DeserializeSeed::deserialize(UniqueSeed(self.0), d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        self.count()?;
        let (mut items, mut duplicate) = (Vec::new(), None);
        while let Some(item) = seq.next_element_seed(UniqueSeed(self.0))? {
            duplicate = duplicate.or(item.duplicate);
            items.push(item.value);
        }
        Ok(Unique {
            value: Value::Array(items),
            duplicate,
        })
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
        self.count()?;
        let (mut object, mut duplicate) = (Map::new(), None);
        while let Some(key) = map.next_key::<String>()? {
            let child = map.next_value_seed(UniqueSeed(self.0))?;
            if duplicate.is_none() {
                if let Some(mut path) = child.duplicate {
                    path.push(key.clone());
                    duplicate = Some(path);
                }
            }
            match object.entry(key) {
                serde_json::map::Entry::Occupied(mut entry) => {
                    duplicate = duplicate.or_else(|| Some(vec![entry.key().clone()]));
                    entry.insert(child.value);
                }
                serde_json::map::Entry::Vacant(entry) => {
                    entry.insert(child.value);
                }
            }
        }
        Ok(Unique {
            value: Value::Object(object),
            duplicate,
        })
    }
}

/// Decodes one message (without its NUL). Errors are the reply to send.
fn parse_call(bytes: &[u8]) -> Result<Call, VarlinkError> {
    let not_json = |err: serde_json::Error| VarlinkError::invalid_message(format!("not JSON: {err}"));
    let budget = std::cell::Cell::new(0);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let Unique { value, duplicate } =
        serde::de::DeserializeSeed::deserialize(UniqueSeed(&budget), &mut deserializer).map_err(not_json)?;
    deserializer.end().map_err(not_json)?;
    if let Some(path) = duplicate {
        // A repeated parameter, or one whose value repeats a key, is that
        // parameter's fault; any other repetition is the message's.
        return Err(match path.as_slice() {
            [.., parameter, top] if top == "parameters" => VarlinkError::invalid_parameter(parameter),
            _ => VarlinkError::invalid_message(format!("key {:?} appears twice", path[0])),
        });
    }
    let Value::Object(mut object) = value else {
        return Err(VarlinkError::invalid_message("a call must be a JSON object"));
    };
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        Some(_) => return Err(VarlinkError::invalid_message("\"method\" must be a string")),
        None => return Err(VarlinkError::invalid_message("a call needs a \"method\"")),
    };
    let parameters = match object.remove("parameters") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(parameters)) => parameters,
        Some(_) => return Err(VarlinkError::invalid_parameter("parameters")),
    };
    let flag = |object: &mut Map<String, Value>, name: &str| match object.remove(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(_) => Err(VarlinkError::invalid_parameter(name)),
    };
    let oneway = flag(&mut object, "oneway")?;
    let more = flag(&mut object, "more")?;
    let upgrade = flag(&mut object, "upgrade")?;
    if upgrade {
        // No method of ours upgrades the connection to another protocol.
        return Err(VarlinkError::invalid_parameter("upgrade"));
    }
    Ok(Call {
        method,
        parameters,
        oneway,
        more,
    })
}

/// An integer parameter the IDL calls `int`, limited to `MIN..=MAX`: a
/// negative, fractional, non-numeric or out-of-range value fails to
/// decode, and the call is refused blaming that parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
struct Int<const MIN: u64, const MAX: u64>(u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Int<MIN, MAX> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(deserializer)?;
        if (MIN..=MAX).contains(&n) {
            Ok(Int(n))
        } else {
            Err(serde::de::Error::custom(format_args!("{n} is outside {MIN}..={MAX}")))
        }
    }
}

const I32_MAX: u64 = i32::MAX as u64;
const U32_MAX: u64 = u32::MAX as u64;
/// A process id: 1..=i32::MAX.
type Pid = Int<1, I32_MAX>;
/// An index into the fds passed with the message.
type FdIndex = Int<0, { u64::MAX }>;
/// Milliseconds, as the gRPC API's uint32 fields.
type Millis = Int<0, U32_MAX>;

/// `io.reapd.Reaper`'s call parameters, one struct per method, named as in
/// the IDL (a test compares them with it). Unknown parameters are refused.
mod params {
    use super::*;

    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
    pub(super) struct KillAndReap {
        pub pid: Option<Pid>,
        pub start_time: Option<Int<0, { u64::MAX }>>,
        pub pidfd: Option<FdIndex>,
        pub pidns: Option<FdIndex>,
        pub wait_for_exit_ms: Option<Millis>,
        pub grace_ms: Option<Millis>,
        pub reap_delay_ms: Option<Millis>,
    }

    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
    pub(super) struct CheckPermission {
        pub pid: Option<Pid>,
        pub start_time: Option<Int<0, { u64::MAX }>>,
        pub pidfd: Option<FdIndex>,
        pub pidns: Option<FdIndex>,
    }

    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
    pub(super) struct ListCandidates {
        pub sort_by: Option<SortKey>,
        pub limit: Option<Int<0, 1000>>,
        pub offset: Option<Int<0, U32_MAX>>,
        pub pidns: Option<FdIndex>,
    }

    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
    pub(super) struct KillCgroup {
        pub cgroup: Option<String>,
        pub unit: Option<String>,
        pub pidns: Option<FdIndex>,
        pub reap_delay_ms: Option<Millis>,
    }

    /// `GetCapabilities`, `WatchKills` and the metrics and service calls
    /// without parameters.
    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct None {}

    /// The methods of `io.reapd.Reaper` and their parameter names, as the
    /// structs above decode them (for the IDL test).
    #[cfg(test)]
    pub(super) fn table() -> Vec<(&'static str, Vec<String>)> {
        fn names<T: Serialize + Default>() -> Vec<String> {
            match serde_json::to_value(T::default()).unwrap() {
                Value::Object(map) => map.keys().cloned().collect(),
                _ => unreachable!("parameter structs are objects"),
            }
        }
        vec![
            ("KillAndReap", names::<KillAndReap>()),
            ("CheckPermission", names::<CheckPermission>()),
            ("GetCapabilities", names::<None>()),
            ("ListCandidates", names::<ListCandidates>()),
            ("KillCgroup", names::<KillCgroup>()),
            ("WatchKills", names::<None>()),
        ]
    }
}

/// Decodes a call's parameters into `T`. On failure the error blames the
/// first parameter (in name order) that `T` refuses on its own: unknown,
/// or of the wrong type or range.
fn decode_params<T: serde::de::DeserializeOwned>(parameters: &Map<String, Value>) -> Result<T, VarlinkError> {
    serde_json::from_value(Value::Object(parameters.clone())).map_err(|_| {
        let blamed = parameters
            .iter()
            .find(|(name, value)| {
                let alone = Map::from_iter([((*name).clone(), (*value).clone())]);
                serde_json::from_value::<T>(Value::Object(alone)).is_err()
            })
            .map_or("parameters", |(name, _)| name.as_str());
        VarlinkError::invalid_parameter(blamed)
    })
}

/// The fds that came with one message, by index. A call takes the ones its
/// parameters name; whatever is left when this is dropped is closed: a
/// pidfd inline (that cannot block), anything else on a closer thread.
#[derive(Debug, Default)]
pub struct MessageFds {
    fds: Vec<Option<Received>>,
}

impl MessageFds {
    /// Takes the fd at `index` if it is a pidfd. `parameter` is the name to
    /// blame. A non-pidfd is closed off the executor and refused.
    pub fn take_pidfd(&mut self, index: u64, parameter: &str) -> Result<OwnedFd, VarlinkError> {
        self.take(index, parameter)?
            .into_pidfd()
            .ok_or_else(|| VarlinkError::invalid_parameter(parameter))
    }

    /// Takes the fd at `index` if it is a pid namespace (an nsfs file,
    /// whose close cannot block); anything else is closed off the executor
    /// and refused.
    pub fn take_pid_namespace(&mut self, index: u64, parameter: &str) -> Result<OwnedFd, VarlinkError> {
        self.take(index, parameter)?
            .into_pid_namespace()
            .ok_or_else(|| VarlinkError::invalid_parameter(parameter))
    }

    fn take(&mut self, index: u64, parameter: &str) -> Result<Received, VarlinkError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.fds.get_mut(i))
            .and_then(Option::take)
            .ok_or_else(|| VarlinkError::invalid_parameter(parameter))
    }

    pub fn len(&self) -> usize {
        self.fds.iter().filter(|fd| fd.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // fds of an unfinished message: closed like any others, off the
        // executor unless they are pidfds.
        for fd in self.partial_fds.drain(..) {
            fd.dispose();
        }
    }
}

impl Drop for MessageFds {
    fn drop(&mut self) {
        for fd in self.fds.drain(..).flatten() {
            fd.dispose();
        }
    }
}

fn fds_refused(reason: &str) -> VarlinkError {
    VarlinkError::new(
        "io.reapd.Reaper.RateLimited",
        json!({ "reason": reason, "retryAfterMs": 1000 }),
    )
}

/// How many fds a call may take: one more than the highest index its
/// [`FD_PARAMS`] name (an index beyond [`MAX_FDS_PER_CALL`] names nothing
/// and is refused when the call runs).
fn fds_named(call: &Call) -> usize {
    FD_PARAMS
        .iter()
        .filter_map(|name| call.parameters.get(*name)?.as_u64())
        .filter_map(|index| usize::try_from(index).ok())
        .filter(|index| *index < MAX_FDS_PER_CALL)
        .map(|index| index + 1)
        .max()
        .unwrap_or(0)
}

/// The target a call names, plus the caller's pid namespace if it passed
/// one (`pidns`, an fd index). Takes the named fds out of `fds`; the rest are closed when
/// `fds` is dropped.
fn target_of(
    pid: Option<Pid>,
    start_time: Option<Int<0, { u64::MAX }>>,
    pidfd: Option<FdIndex>,
    pidns: Option<FdIndex>,
    fds: &mut MessageFds,
) -> Result<(TargetSpec, Option<OwnedFd>), VarlinkError> {
    let (pid, start_time, pidfd, pidns) = (
        pid.map(|p| p.0),
        start_time.map(|t| t.0),
        pidfd.map(|i| i.0),
        pidns.map(|i| i.0),
    );
    // Each index names one received fd, taken once: the same fd cannot be
    // both the target and the namespace.
    let spec = match (pid, pidfd) {
        (Some(pid), None) => TargetSpec::Pid {
            pid: pid as i32,
            start_time,
        },
        (None, Some(index)) => {
            if start_time.is_some() {
                // A pidfd already names exactly one process; a start time
                // would be a second, possibly contradicting, name.
                return Err(VarlinkError::invalid_parameter("startTime"));
            }
            TargetSpec::Pidfd(fds.take_pidfd(index, "pidfd")?)
        }
        (Some(_), Some(_)) => return Err(VarlinkError::invalid_parameter("pidfd")),
        (None, None) => return Err(VarlinkError::invalid_parameter("pid")),
    };
    let pidns = pidns.map(|index| fds.take_pid_namespace(index, "pidns")).transpose()?;
    Ok((spec, pidns))
}

/// Answers one call: the reply parameters, or the error to send.
async fn dispatch(
    engine: &Engine,
    caller: &Arc<Caller>,
    call: &Call,
    fds: &mut MessageFds,
) -> Result<Box<RawValue>, VarlinkError> {
    let (interface, name) = match call.method.rsplit_once('.') {
        Some((interface, name)) if !interface.is_empty() && !name.is_empty() => (interface, name),
        _ => {
            return Err(VarlinkError::new(
                "org.varlink.service.InterfaceNotFound",
                json!({ "interface": call.method }),
            ))
        }
    };
    let method_not_found = || VarlinkError::new("org.varlink.service.MethodNotFound", json!({ "method": call.method }));
    let params = &call.parameters;
    match interface {
        SERVICE_INTERFACE => match name {
            "GetInfo" => {
                let params::None {} = decode_params(params)?;
                reply(json!({
                    "vendor": "reapd",
                    "product": "reapd",
                    "version": env!("CARGO_PKG_VERSION"),
                    // No public home yet: the manual page is where the service is documented
                    // (the unit's Documentation= names it too).
                    "url": "man:reapd(8)",
                    "interfaces": [SERVICE_INTERFACE, INTERFACE, METRICS_INTERFACE],
                }))
            }
            "GetInterfaceDescription" => {
                if let Some(unknown) = params.keys().find(|k| *k != "interface") {
                    return Err(VarlinkError::invalid_parameter(unknown));
                }
                match params.get("interface") {
                    Some(Value::String(i)) if i == INTERFACE => {
                        reply(json!({ "description": reapd_proto::VARLINK_INTERFACE }))
                    }
                    Some(Value::String(i)) if i == SERVICE_INTERFACE => {
                        reply(json!({ "description": SERVICE_DESCRIPTION }))
                    }
                    Some(Value::String(i)) if i == METRICS_INTERFACE => {
                        reply(json!({ "description": METRICS_DESCRIPTION }))
                    }
                    Some(Value::String(i)) => Err(VarlinkError::new(
                        "org.varlink.service.InterfaceNotFound",
                        json!({ "interface": i }),
                    )),
                    _ => Err(VarlinkError::invalid_parameter("interface")),
                }
            }
            _ => Err(method_not_found()),
        },
        INTERFACE => match name {
            "KillAndReap" => {
                let p: params::KillAndReap = decode_params(params)?;
                let (target, pidns) = target_of(p.pid, p.start_time, p.pidfd, p.pidns, fds)?;
                let millis = |ms: Option<Millis>| ms.map(|ms| Duration::from_millis(ms.0));
                let request = KillRequest {
                    target,
                    wait_for_exit: millis(p.wait_for_exit_ms),
                    pidns,
                    grace: millis(p.grace_ms),
                    reap_delay: millis(p.reap_delay_ms),
                };
                let report = engine.kill_and_reap(caller, request).await.map_err(error_of)?;
                reply(model::KillReport::from(report))
            }
            "CheckPermission" => {
                let p: params::CheckPermission = decode_params(params)?;
                let (target, pidns) = target_of(p.pid, p.start_time, p.pidfd, p.pidns, fds)?;
                let report = engine
                    .check_permission_in(caller, target, pidns)
                    .await
                    .map_err(error_of)?;
                reply(model::Permission::from(report))
            }
            "GetCapabilities" => {
                let params::None {} = decode_params(params)?;
                reply(model::Capabilities::from(engine.capabilities()))
            }
            "ListCandidates" => {
                let p: params::ListCandidates = decode_params(params)?;
                // `unspecified` is what an unknown name decodes to: refuse
                // it rather than sort by the default.
                let key = match p.sort_by {
                    Some(SortKey::Unspecified) => return Err(VarlinkError::invalid_parameter("sortBy")),
                    Some(key) => key,
                    None => SortKey::Unique,
                };
                let pidns = p
                    .pidns
                    .map(|index| fds.take_pid_namespace(index.0, "pidns"))
                    .transpose()?;
                let query = candidates::Query {
                    key,
                    offset: p.offset.map_or(0, |o| o.0 as usize),
                    limit: p.limit.map_or(0, |l| l.0 as usize),
                };
                let report = engine.candidates(caller, query, pidns).await.map_err(error_of)?;
                reply(model::Candidates::from(report))
            }
            "KillCgroup" => {
                let p: params::KillCgroup = decode_params(params)?;
                let group = match (p.cgroup, p.unit) {
                    (Some(path), None) => GroupSpec::Path(path),
                    (None, Some(unit)) => GroupSpec::Unit(unit),
                    (Some(_), Some(_)) => return Err(VarlinkError::invalid_parameter("unit")),
                    (None, None) => return Err(VarlinkError::invalid_parameter("cgroup")),
                };
                let pidns = p
                    .pidns
                    .map(|index| fds.take_pid_namespace(index.0, "pidns"))
                    .transpose()?;
                let request = GroupKillRequest {
                    group,
                    pidns,
                    reap_delay: p.reap_delay_ms.map(|ms| Duration::from_millis(ms.0)),
                };
                let report = engine.kill_cgroup(caller, request).await.map_err(error_of)?;
                reply(model::GroupReport::from(report))
            }
            _ => Err(method_not_found()),
        },
        other => Err(VarlinkError::new(
            "org.varlink.service.InterfaceNotFound",
            json!({ "interface": other }),
        )),
    }
}

/// Whether the method exists: `more` is refused only on methods that exist
/// (none of ours streams), so an unknown method still gets MethodNotFound.
fn is_known_method(method: &str) -> bool {
    matches!(
        method,
        "org.varlink.service.GetInfo"
            | "org.varlink.service.GetInterfaceDescription"
            | "io.reapd.Reaper.KillAndReap"
            | "io.reapd.Reaper.CheckPermission"
            | "io.reapd.Reaper.GetCapabilities"
            | "io.reapd.Reaper.KillCgroup"
            | "io.reapd.Reaper.ListCandidates"
            | "io.reapd.Reaper.WatchKills"
    )
}

fn encode(reply: Result<Box<RawValue>, VarlinkError>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Parameters<'a> {
        parameters: &'a RawValue,
    }
    let mut bytes = match reply {
        Ok(parameters) => serde_json::to_vec(&Parameters {
            parameters: &parameters,
        }),
        Err(err) => serde_json::to_vec(&json!({ "error": err.name, "parameters": err.parameters })),
    }
    .expect("a reply of JSON text and a serde_json::Value always serialize");
    bytes.push(0);
    bytes
}

/// What the receive path produced.
enum Incoming {
    /// One complete message (without its NUL), decoded, with its fds.
    Message(Result<Call, VarlinkError>, MessageFds),
    /// Bytes of a message that is not complete yet: the slow-loris timer
    /// now applies until it is.
    Partial,
    /// The client closed the connection; `mid_message` if it left a message
    /// unfinished.
    Eof { mid_message: bool },
    /// A message longer than [`MAX_MESSAGE_BYTES`].
    Oversized,
    /// The sender passed fds while over its fd budget: nothing was read
    /// (reading would release them here). `call` is the message, if
    /// complete, to refuse with a reply; the connection is then closed.
    FdsRefused {
        reason: String,
        call: Option<Result<Call, VarlinkError>>,
    },
}

/// Bytes read off the socket and the fds kept with them.
type Taken = (Vec<u8>, Vec<Received>);

/// The receive state of one connection.
struct Receiver {
    uid: u32,
    privileged: bool,
    closer: Arc<Closer>,
    /// Bytes of the current message consumed from the socket so far (only
    /// when a message arrives in pieces each carrying fds; usually empty).
    partial: Vec<u8>,
    /// fds that came with `partial`.
    partial_fds: Vec<Received>,
    /// Unconsumed bytes of an incomplete message wait in the socket.
    incomplete: bool,
}

impl Receiver {
    /// Reads the next `len` peeked bytes and the fds sent with them,
    /// keeping up to `want` of those fds (each charged to the sender).
    ///
    /// The kernel releases a passed fd on the reading thread when a read
    /// has no room for it, and that release can block for as long as the
    /// sender likes (a TCP socket with `SO_LINGER` and unsent data waits in
    /// `tcp_close`; a FUSE file with dirty pages in writeback-cache mode
    /// waits for its server). So a read never asks the kernel to drop one:
    /// when the peek saw fds (`carries_fds`), the read has room for all that
    /// one read can bring ([`SCM_MAX_FD`]), and those the call does not
    /// take are closed on one closer thread, charged to the sender. Such a
    /// read first needs at least one unit of the sender's budget; a sender
    /// over its budget gets `Err(reason)` and nothing is read.
    fn take(
        &self,
        stream: &UnixStream,
        len: usize,
        want: usize,
        carries_fds: bool,
    ) -> std::io::Result<Result<Taken, String>> {
        if !carries_fds {
            // Nothing is attached to these bytes (queued data never changes).
            return receive_exact(stream, len, 0).map(|(bytes, _)| Ok((bytes, Vec::new())));
        }
        let units = match self.closer.reserve(self.uid, want.max(1), self.privileged) {
            Ok(units) => units,
            Err(err) => return Ok(Err(err.to_string())),
        };
        let (bytes, fds) = receive_exact(stream, len, SCM_MAX_FD)?;
        let mut units = units.into_iter();
        let mut kept = Vec::new();
        let mut extra = Vec::new();
        for fd in fds {
            match units.next().filter(|_| kept.len() < want) {
                Some(unit) => kept.push(Received::new(fd, unit)),
                None => extra.push(fd),
            }
        }
        if !extra.is_empty() {
            tracing::debug!(
                caller_uid = self.uid,
                fds = extra.len(),
                "fds the call does not name; closing them off the executor"
            );
            let charged = self.closer.charge(self.uid, extra.len());
            closer::close_batch(
                extra
                    .into_iter()
                    .zip(charged)
                    .map(|(fd, unit)| Received::new(fd, unit))
                    .collect(),
            );
        }
        Ok(Ok((bytes, kept)))
    }

    /// One step of the receive path, run when the socket is readable.
    /// `Err(WouldBlock)` waits for more bytes.
    fn step(&mut self, stream: &UnixStream) -> std::io::Result<Incoming> {
        let queued = rustix::io::ioctl_fionread(stream).map_err(std::io::Error::from)? as usize;
        let room = MAX_MESSAGE_BYTES + 1 - self.partial.len().min(MAX_MESSAGE_BYTES);
        let mut peeked = vec![0u8; queued.clamp(1, room)];
        // The peek installs no fd and consumes nothing; it says whether fds
        // are attached to the bytes it saw (it stops after the first write
        // that carried some).
        let (n, carries_fds) = crate::os::sys::peek_for_fds(stream.as_fd(), &mut peeked)?;
        if n == 0 {
            let mid_message = !self.partial.is_empty() || self.incomplete;
            return Ok(Incoming::Eof { mid_message });
        }
        peeked.truncate(n);
        let Some(nul) = peeked.iter().position(|&b| b == 0) else {
            if self.partial.len() + n > MAX_MESSAGE_BYTES {
                return Ok(Incoming::Oversized);
            }
            if n < queued {
                // The peek stopped after a write that carried fds, before
                // this message's end: take those bytes (and their fds) as
                // part of this message, then look further.
                let want = MAX_FDS_PER_CALL.saturating_sub(self.partial_fds.len());
                let (bytes, fds) = match self.take(stream, n, want, carries_fds)? {
                    Ok(taken) => taken,
                    Err(reason) => return Ok(Incoming::FdsRefused { reason, call: None }),
                };
                self.partial.extend_from_slice(&bytes);
                self.partial_fds.extend(fds);
                self.incomplete = true;
                return Ok(Incoming::Partial);
            }
            if peer_hung_up(stream) {
                // The rest can never come. (The runtime never clears a
                // hang-up from readiness, so waiting would spin.)
                return Ok(Incoming::Eof { mid_message: true });
            }
            if !self.incomplete {
                self.incomplete = true;
                return Ok(Incoming::Partial);
            }
            // Nothing new to decide until more bytes come (a new edge).
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        if self.partial.len() + nul > MAX_MESSAGE_BYTES {
            return Ok(Incoming::Oversized);
        }
        let mut message = std::mem::take(&mut self.partial);
        message.extend_from_slice(&peeked[..nul]);
        let call = parse_call(&message);
        let named = call.as_ref().map(fds_named).unwrap_or(0);
        let want = named.saturating_sub(self.partial_fds.len());
        let fds = match self.take(stream, nul + 1, want, carries_fds)? {
            Ok((_, fds)) => fds,
            Err(reason) => {
                return Ok(Incoming::FdsRefused {
                    reason,
                    call: Some(call),
                })
            }
        };
        let mut all: Vec<Received> = std::mem::take(&mut self.partial_fds);
        all.extend(fds);
        self.incomplete = false;
        let fds = MessageFds {
            fds: all.into_iter().map(Some).collect(),
        };
        Ok(Incoming::Message(call, fds))
    }
}

/// The peer shut down its side: no more bytes will come.
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut fds = [rustix::event::PollFd::new(stream, rustix::event::PollFlags::RDHUP)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .intersects(rustix::event::PollFlags::RDHUP | rustix::event::PollFlags::HUP)
}

/// Reads exactly `len` bytes (already seen by a peek) with room for `room`
/// fds; returns the fds the kernel installed (none when `room` is 0, and
/// then the caller knows from its peek that none were attached).
fn receive_exact(stream: &UnixStream, len: usize, room: usize) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut bytes = vec![0u8; len];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(room.max(1)))];
    let mut control = if room == 0 {
        RecvAncillaryBuffer::default()
    } else {
        RecvAncillaryBuffer::new(&mut space)
    };
    let received = {
        let mut iov = [IoSliceMut::new(&mut bytes)];
        recvmsg(
            stream,
            &mut iov,
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
        )?
    };
    bytes.truncate(received.bytes);
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if received.bytes != len {
        // Peeked bytes are there to read; anything else is a broken socket.
        // (Any fds that came are closed off the executor, charged to nobody.)
        fds.into_iter().for_each(Received::unbudgeted);
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "fewer bytes than peeked",
        ));
    }
    Ok((bytes, fds))
}

/// One connection's state.
struct Connection {
    stream: UnixStream,
    caller: Arc<Caller>,
    receiver: Receiver,
}

impl Connection {
    async fn next(&mut self) -> std::io::Result<Incoming> {
        loop {
            self.stream.readable().await?;
            let (stream, receiver) = (&self.stream, &mut self.receiver);
            match stream.try_io(Interest::READABLE, || receiver.step(stream)) {
                Ok(incoming) => return Ok(incoming),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        }
    }

    async fn write(&mut self, bytes: &[u8], timeout: Duration) -> std::io::Result<()> {
        // A client that never reads its replies must not pin the task.
        match tokio::time::timeout(timeout, self.stream.write_all(bytes)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client stopped reading",
            )),
        }
    }
}

/// systemd's metrics interface, served beside ours.
pub const METRICS_INTERFACE: &str = "io.systemd.Metrics";
const METRICS_INTERFACE_DOT: &str = "io.systemd.Metrics.";

/// `io.systemd.Metrics`, in the shape systemd gives it (`List` and
/// `Describe`, both with `more`; a metric's value is any JSON value, which
/// the varlink IDL can only call `object`).
pub const METRICS_DESCRIPTION: &str = "\
# Metrics of the reapd broker, in systemd's io.systemd.Metrics shape: one
# reply per metric (continues: true but the last). Names are prefixed
# io.reapd.; histograms are _bucket (fields.le), _count and _sum families.
# Readable by root and by callers a watch rule of the policy names.
interface io.systemd.Metrics

type MetricFamilyType (counter, gauge, string)

# Every metric now.
method List() -> (name: string, value: object, object: ?string, fields: ?object)

# Every metric family: what it counts.
method Describe() -> (name: string, description: string, type: MetricFamilyType)

error NoSuchMetric ()
";

/// The replies of an `io.systemd.Metrics` call, or its error.
fn metrics_replies(engine: &Engine, caller: &Caller, call: &Call) -> Result<Vec<Value>, VarlinkError> {
    let method = &call.method[METRICS_INTERFACE_DOT.len()..];
    if !matches!(method, "List" | "Describe") {
        return Err(VarlinkError::new(
            "org.varlink.service.MethodNotFound",
            json!({ "method": call.method }),
        ));
    }
    let params::None {} = decode_params(&call.parameters)?;
    if !call.more {
        return Err(VarlinkError::new("org.varlink.service.ExpectedMore", json!({})));
    }
    let metrics = engine.metrics(caller).map_err(error_of)?;
    let prefixed = |name: &str| format!("{}{name}", crate::engine::metrics::PREFIX);
    Ok(match method {
        "List" => metrics
            .into_iter()
            .map(|m| {
                let mut reply = json!({ "name": prefixed(&m.name), "value": m.value });
                if !m.fields.is_empty() {
                    let fields: Map<String, Value> = m.fields.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
                    reply["fields"] = Value::Object(fields);
                }
                reply
            })
            .collect(),
        _ => crate::engine::metrics::FAMILIES
            .iter()
            .map(
                |(name, kind, description)| json!({ "name": prefixed(name), "description": description, "type": kind }),
            )
            .collect(),
    })
}

/// The one streaming method.
const WATCH_KILLS: &str = "io.reapd.Reaper.WatchKills";

/// Serves `WatchKills` on `conn` until the client hangs up, the broker
/// ends the stream (at shutdown, after the kills in flight) or a write
/// fails (`Ok`), or refuses the call (`Err`, the reply to send). Writes wait as long as the client does not read (no
/// timeout): meanwhile the subscription's queue fills and drops, which the
/// next event reports, and kills never wait. Bytes the client sends during
/// the stream are left unread (varlink clients wait for the last reply).
async fn watch_kills(
    conn: &mut Connection,
    engine: &Engine,
    call: &Call,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), VarlinkError> {
    let params::None {} = decode_params(&call.parameters)?;
    if !call.more {
        return Err(VarlinkError::new("org.varlink.service.ExpectedMore", json!({})));
    }
    if call.oneway {
        // No reply may be sent, so there is nothing to stream.
        return Ok(());
    }
    let mut subscription = engine.watch_kills(&conn.caller).map_err(error_of)?;
    // The subscription exists: say so, so the client knows every later
    // kill will reach it.
    if conn
        .stream
        .write_all(&encode_continues(json!({ "ready": true })))
        .await
        .is_err()
    {
        return Ok(());
    }
    // Hang-up shows as read-closed readiness; once the client has sent
    // bytes instead (readiness that stays set), a periodic check takes over.
    let mut watch_readable = true;
    let mut hangup_check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = subscription.next() => {
                let Some(event) = event else { return Ok(()) };
                let bytes = encode_continues(json!({ "event": model::KillEvent::from(event) }));
                tokio::select! {
                    written = conn.stream.write_all(&bytes) => {
                        if written.is_err() {
                            return Ok(());
                        }
                    }
                    // Only a write to a client that does not read waits
                    // for the stop; the stream itself ends when the broker
                    // closes it, after the last kill's event.
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                }
            }
            ready = conn.stream.ready(Interest::READABLE), if watch_readable => {
                match ready {
                    Ok(ready) if !ready.is_read_closed() => watch_readable = false,
                    _ => return Ok(()),
                }
            }
            _ = hangup_check.tick(), if !watch_readable => {
                if peer_hung_up(&conn.stream) {
                    return Ok(());
                }
            }
        }
    }
}

/// A `more` reply: `continues` is always true, as the stream ends only with
/// the connection.
fn encode_continues(parameters: Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&json!({ "parameters": parameters, "continues": true }))
        .expect("a serde_json::Value always serializes");
    bytes.push(0);
    bytes
}

/// Serves one connection until the client closes it, it sends an oversized
/// message, it is too slow with a message (or with its first one), or the
/// broker shuts down (between calls).
async fn serve_connection(
    accepted: Accepted,
    engine: Arc<Engine>,
    closer: Arc<Closer>,
    idle_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let Accepted {
        stream,
        caller,
        slot,
        privileged,
        accepted_at,
    } = accepted;
    let closer_for_close = Arc::clone(&closer);
    let mut conn = Connection {
        stream,
        receiver: Receiver {
            uid: caller.uid,
            privileged,
            closer,
            partial: Vec::new(),
            partial_fds: Vec::new(),
            incomplete: false,
        },
        caller,
    };
    // The slow-loris deadline: set until the first call completes, and
    // while a message is incomplete; an idle connection between calls has
    // none.
    let mut deadline = Some(accepted_at + idle_timeout);
    serve_calls(&mut conn, &engine, idle_timeout, &mut deadline, &mut shutdown).await;
    listener::close_socket(conn.stream, conn.caller.uid, &closer_for_close, slot);
}

/// The call loop of [`serve_connection`]; returns when the connection is
/// to be closed.
async fn serve_calls(
    conn: &mut Connection,
    engine: &Engine,
    idle_timeout: Duration,
    deadline: &mut Option<tokio::time::Instant>,
    shutdown: &mut watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        let next = async {
            match *deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, conn.next()).await,
                None => Ok(conn.next().await),
            }
        };
        let incoming = tokio::select! {
            incoming = next => incoming,
            _ = shutdown.changed() => return,
        };
        let (call, mut fds) = match incoming {
            Ok(Ok(Incoming::Message(call, fds))) => (call, fds),
            Ok(Ok(Incoming::Partial)) => {
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + idle_timeout);
                continue;
            }
            Ok(Ok(Incoming::FdsRefused { reason, call })) => {
                tracing::info!(
                    caller_pid = conn.caller.pid,
                    caller_uid = conn.caller.uid,
                    reason = %reason,
                    "fds passed over the sender's budget; connection closed"
                );
                if let Some(call) = call {
                    if !matches!(call, Ok(Call { oneway: true, .. })) {
                        let _ = conn
                            .write(&encode(Err(fds_refused(&reason))), Duration::from_secs(1))
                            .await;
                    }
                }
                return;
            }
            Ok(Ok(Incoming::Eof { mid_message })) => {
                if mid_message {
                    tracing::debug!(caller_pid = conn.caller.pid, "connection closed mid-message");
                }
                return;
            }
            Ok(Ok(Incoming::Oversized)) => {
                let reply = Err(VarlinkError::invalid_message(format!(
                    "message longer than {MAX_MESSAGE_BYTES} bytes; closing the connection"
                )));
                let _ = conn.write(&encode(reply), Duration::from_secs(1)).await;
                tracing::info!(
                    caller_pid = conn.caller.pid,
                    caller_uid = conn.caller.uid,
                    "oversized varlink message; connection closed"
                );
                return;
            }
            Ok(Err(err)) => {
                tracing::debug!(caller_pid = conn.caller.pid, error = %err, "read failed; closing");
                return;
            }
            Err(_) => {
                tracing::debug!(
                    caller_pid = conn.caller.pid,
                    "no complete call within the timeout; closing"
                );
                return;
            }
        };
        let (reply, oneway) = match call {
            Ok(call) if call.method == WATCH_KILLS => {
                // It takes no fds: close whatever came with it now.
                drop(std::mem::take(&mut fds));
                match watch_kills(conn, engine, &call, shutdown).await {
                    // The stream ended (hang-up, shutdown, a failed write):
                    // so does the connection, as varlink has no way to end
                    // a `more` call but an error or the connection.
                    Ok(()) => return,
                    Err(err) => (Err(err), call.oneway),
                }
            }
            Ok(call) if call.method.starts_with(METRICS_INTERFACE_DOT) => {
                drop(std::mem::take(&mut fds));
                match metrics_replies(engine, &conn.caller, &call) {
                    Ok(replies) if !call.oneway => {
                        let last = replies.len().saturating_sub(1);
                        for (i, parameters) in replies.into_iter().enumerate() {
                            let bytes = if i < last {
                                encode_continues(parameters)
                            } else {
                                encode(reply(parameters))
                            };
                            if conn.write(&bytes, idle_timeout).await.is_err() {
                                return;
                            }
                        }
                        *deadline = None;
                        continue;
                    }
                    Ok(_) => {
                        *deadline = None;
                        continue;
                    }
                    Err(err) => (Err(err), call.oneway),
                }
            }
            Ok(call) if call.more && is_known_method(&call.method) => {
                // No other method of ours streams: `more` is a malformed call.
                (Err(VarlinkError::invalid_parameter("more")), call.oneway)
            }
            Ok(call) => {
                let reply = dispatch(engine, &conn.caller, &call, &mut fds).await;
                (reply, call.oneway)
            }
            Err(err) => (Err(err), false),
        };
        // Whatever the call did not take is closed now (off the executor
        // unless it is a pidfd).
        drop(fds);
        if let Err(err) = &reply {
            tracing::debug!(caller_pid = conn.caller.pid, error = err.name, "varlink call failed");
        }
        if !oneway {
            if let Err(err) = conn.write(&encode(reply), idle_timeout).await {
                tracing::debug!(caller_pid = conn.caller.pid, error = %err, "cannot reply; closing");
                return;
            }
        }
        // A call completed: no timer until the next message starts (a
        // pipelined one already waiting re-arms it if incomplete).
        *deadline = None;
    }
}

/// Serves varlink on `listener` until `shutdown` completes, then finishes
/// the calls in flight (up to [`SHUTDOWN_GRACE`]) and returns. Mirrors
/// [`crate::transport::grpc::serve`]: same caller identity, same connection caps
/// (`counter` may be shared with the gRPC listener), same timeouts.
pub async fn serve(
    listener: UnixListener,
    engine: Arc<Engine>,
    config: AcceptConfig,
    counter: Arc<ConnectionCounter>,
    closer: Arc<Closer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let features = Arc::clone(engine.features());
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone of `alive`; when all are gone,
    // `all_done` yields None.
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    let idle = config.limits.idle_timeout;
    let accept_engine = Arc::clone(&engine);
    let acceptor = tokio::spawn(listener::accept_loop(
        listener,
        features,
        config,
        counter,
        move |accepted| {
            let engine = Arc::clone(&accept_engine);
            let closer = Arc::clone(&closer);
            let stop = stop_rx.clone();
            let alive = alive.clone();
            tokio::spawn(async move {
                serve_connection(accepted, engine, closer, idle, stop).await;
                drop(alive);
            });
            true
        },
    ));
    shutdown.await;
    acceptor.abort();
    // The acceptor owned the last `alive` outside the tasks; wait for it to
    // drop so `all_done` ends when the tasks do.
    let _ = acceptor.await;
    let _ = stop_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, all_done.recv()).await.is_err() {
        tracing::warn!("varlink calls still in flight after the grace period; stopping anyway");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rejects_non_calls() {
        for bad in [&b"nope"[..], b"[]", b"{}", b"{\"method\":1}", b"\"x\""] {
            let err = parse_call(bad).unwrap_err();
            assert_eq!(
                err.name,
                "io.reapd.Reaper.InvalidMessage",
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let err = parse_call(br#"{"method":"a.B","parameters":[]}"#).unwrap_err();
        assert_eq!(err, VarlinkError::invalid_parameter("parameters"));
        let err = parse_call(br#"{"method":"a.B","oneway":"yes"}"#).unwrap_err();
        assert_eq!(err, VarlinkError::invalid_parameter("oneway"));
    }

    /// A repeated key is refused, not resolved last-wins: the parameter is
    /// blamed when it is a parameter's (or inside one's value).
    #[test]
    fn parse_refuses_duplicate_keys() {
        for (json, blamed) in [
            (r#"{"method":"a.B","parameters":{"pid":1,"pid":2}}"#, "pid"),
            (
                r#"{"method":"a.B","parameters":{"pid":1,"startTime":{"a":1,"a":1}}}"#,
                "startTime",
            ),
            (r#"{"method":"a.B","parameters":{"x":[{"k":1,"k":2}]}}"#, "x"),
        ] {
            assert_eq!(
                parse_call(json.as_bytes()).unwrap_err(),
                VarlinkError::invalid_parameter(blamed),
                "{json}"
            );
        }
        for json in [
            r#"{"method":"a.B","method":"c.D"}"#,
            r#"{"method":"a.B","parameters":{},"parameters":{"pid":1}}"#,
            r#"{"method":"a.B","more":false,"more":true}"#,
        ] {
            assert_eq!(
                parse_call(json.as_bytes()).unwrap_err().name,
                "io.reapd.Reaper.InvalidMessage",
                "{json}"
            );
        }
        // Equal values under different keys, and equal keys in different
        // objects, are not duplicates.
        let call = parse_call(br#"{"method":"a.B","parameters":{"pid":1,"startTime":1},"x":{"pid":1}}"#).unwrap();
        assert_eq!(call.parameters.len(), 2);
        let call = parse_call(br#"{"method":"a.B","parameters":{"pid":-0,"limit":1e3}}"#).unwrap();
        assert!(call.parameters["pid"].is_f64() || call.parameters["pid"].is_i64());
        // Trailing bytes are still refused.
        assert!(parse_call(br#"{"method":"a.B"} x"#).is_err());
    }

    /// A message of more values than any call has is refused as soon as
    /// the budget is spent, however it nests them.
    #[test]
    fn parse_stops_at_the_value_budget() {
        let keys = |n: usize| (0..n).map(|i| format!(r#""k{i}":0"#)).collect::<Vec<_>>().join(",");
        let ok = format!(r#"{{"method":"a.B","parameters":{{{}}}}}"#, keys(MAX_VALUES - 3));
        assert!(parse_call(ok.as_bytes()).is_ok());
        for bad in [
            format!(r#"{{"method":"a.B","parameters":{{{}}}}}"#, keys(MAX_VALUES)),
            format!(
                r#"{{"method":"a.B","parameters":{{"x":[{}]}}}}"#,
                vec!["0"; MAX_VALUES].join(",")
            ),
            format!(r#"{{"method":"a.B","x":[{}]}}"#, vec!["[[]]"; MAX_VALUES / 2].join(",")),
        ] {
            let err = parse_call(bad.as_bytes()).unwrap_err();
            assert_eq!(err.name, "io.reapd.Reaper.InvalidMessage", "{bad}");
        }
    }

    #[test]
    fn int_params_are_range_checked_and_blamed() {
        let decode = |json: &str| decode_params::<params::CheckPermission>(&serde_json::from_str(json).unwrap());
        for (json, blamed) in [
            (r#"{"pid":0}"#, "pid"),
            (r#"{"pid":-1}"#, "pid"),
            (r#"{"pid":2147483648}"#, "pid"),
            (r#"{"pid":"1"}"#, "pid"),
            (r#"{"pid":1.5}"#, "pid"),
            (r#"{"pid":7,"startTime":-3}"#, "startTime"),
            (r#"{"pid":7,"bogus":1}"#, "bogus"),
        ] {
            assert_eq!(
                decode(json).unwrap_err(),
                VarlinkError::invalid_parameter(blamed),
                "{json}"
            );
        }
        assert!(decode(r#"{"pid":null}"#).unwrap().pid.is_none());
        assert_eq!(decode(r#"{"pid":7}"#).unwrap().pid, Some(Int(7)));
        let limit = decode_params::<params::ListCandidates>(&serde_json::from_str(r#"{"limit":1001}"#).unwrap());
        assert_eq!(limit.unwrap_err(), VarlinkError::invalid_parameter("limit"));
    }

    /// The parameter structs are the IDL's methods, parameter for parameter.
    #[test]
    fn parameter_structs_are_the_idl_methods() {
        let idl = reapd_proto::VARLINK_INTERFACE;
        let mut declared: Vec<(String, Vec<String>)> = idl
            .lines()
            .filter_map(|line| line.strip_prefix("method "))
            .map(|rest| {
                let (name, rest) = rest.split_once('(').unwrap();
                let (args, _) = rest.split_once(')').unwrap();
                let mut names: Vec<String> = args
                    .split(',')
                    .filter_map(|a| a.split_once(':'))
                    .map(|(n, _)| n.trim().to_string())
                    .collect();
                names.sort();
                (name.to_string(), names)
            })
            .collect();
        declared.sort();
        let mut ours: Vec<(String, Vec<String>)> = params::table()
            .into_iter()
            .map(|(name, mut names)| {
                names.sort();
                (name.to_string(), names)
            })
            .collect();
        ours.sort();
        assert_eq!(ours, declared);
        for (name, _) in &ours {
            assert!(is_known_method(&format!("{INTERFACE}.{name}")), "{name}");
        }
    }

    #[test]
    fn target_needs_exactly_one_name() {
        let mut fds = MessageFds::default();
        let pid = |n| Some(Int(n));
        assert_eq!(
            target_of(None, None, None, None, &mut fds).unwrap_err(),
            VarlinkError::invalid_parameter("pid")
        );
        assert_eq!(
            target_of(pid(1), None, Some(Int(0)), None, &mut fds).unwrap_err(),
            VarlinkError::invalid_parameter("pidfd")
        );
        assert_eq!(
            target_of(None, None, Some(Int(0)), None, &mut fds).unwrap_err(),
            VarlinkError::invalid_parameter("pidfd")
        );
        assert!(matches!(
            target_of(pid(5), Some(Int(9)), None, None, &mut fds),
            Ok((
                TargetSpec::Pid {
                    pid: 5,
                    start_time: Some(9)
                },
                None
            ))
        ));
    }

    #[test]
    fn every_engine_error_has_a_name() {
        let cases = [
            (EngineError::invalid("pid", "x"), "org.varlink.service.InvalidParameter"),
            (EngineError::NotFound("x".into()), "io.reapd.Reaper.NoSuchProcess"),
            (
                EngineError::PermissionDenied {
                    kind: crate::engine::policy::DecisionKind::NoRule,
                    rule: "no-matching-rule".into(),
                    reason: "x".into(),
                },
                "io.reapd.Reaper.PermissionDenied",
            ),
            (
                EngineError::ProcessChanged("x".into()),
                "io.reapd.Reaper.ProcessChanged",
            ),
            (
                EngineError::RateLimited {
                    reason: "x".into(),
                    retry_after: Duration::from_millis(250),
                },
                "io.reapd.Reaper.RateLimited",
            ),
            (EngineError::Internal("x".into()), "io.reapd.Reaper.InternalError"),
        ];
        for (err, name) in cases {
            let mapped = error_of(err);
            assert_eq!(mapped.name, name);
            // Every error name is declared in the published IDL.
            let short = name.rsplit('.').next().unwrap();
            let idl = if name.starts_with("org.") {
                SERVICE_DESCRIPTION
            } else {
                reapd_proto::VARLINK_INTERFACE
            };
            assert!(idl.contains(&format!("error {short} (")), "{name} missing from the IDL");
        }
    }
}
