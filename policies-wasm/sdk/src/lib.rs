//! Write a Trireme plugin (ABI v1, docs/plugin-abi.md) by implementing
//! [`Plugin`] and invoking [`export_plugin!`]: the SDK owns memory
//! management, the JSON and struct encodings and the identity table, so a
//! plugin is only its logic.
//!
//! ```ignore
//! #[derive(Default)]
//! struct Teams;
//! impl trireme_plugin_sdk::Plugin for Teams {
//!     fn resolve(&mut self, w: &Workload) -> Result<Labels, String> { ... }
//! }
//! trireme_plugin_sdk::export_plugin!(Teams, name: "teams", version: "0.1.0", hooks: [resolve]);
//! ```
//!
//! Only the hooks listed in the macro are exported, because the host reads
//! the exports to learn what a plugin does.

use serde::Deserialize;
use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

pub type Labels = BTreeMap<String, String>;

/// What the host knows about a workload (`resolve`'s input).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Workload {
    /// `pod`, `container` or `netns`.
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub annotations: Labels,
    pub namespace_labels: Labels,
    /// Container images, in declaration order.
    pub images: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Abstain = 0,
    Allow = 1,
    Deny = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

/// `decide`'s input, decoded from the ABI's 64-byte struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// 0: the endpoint is not a workload.
    pub src_id: u64,
    pub dst_id: u64,
    pub src_ip: Option<IpAddr>,
    pub dst_ip: Option<IpAddr>,
    pub port: u16,
    /// IANA number: 6 TCP, 17 UDP, 132 SCTP.
    pub protocol: u8,
    pub direction: Direction,
}

impl Query {
    pub fn decode(b: &[u8; 64]) -> Query {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let ip_at = |i: usize| {
            let a: [u8; 16] = b[i..i + 16].try_into().expect("16 bytes");
            (a != [0; 16]).then(|| {
                let v6 = Ipv6Addr::from(a);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            })
        };
        Query {
            src_id: u64_at(0),
            dst_id: u64_at(8),
            src_ip: ip_at(16),
            dst_ip: ip_at(32),
            port: u16::from_le_bytes([b[48], b[49]]),
            protocol: b[50],
            direction: if b[51] == 1 {
                Direction::Egress
            } else {
                Direction::Ingress
            },
        }
    }
}

/// Labels of the identities the host has announced, by id.
#[derive(Debug, Default)]
pub struct Identities(BTreeMap<u64, Labels>);

impl Identities {
    /// `None` for id 0 (not a workload) and ids never announced.
    pub fn labels(&self, id: u64) -> Option<&Labels> {
        self.0.get(&id)
    }
}

/// A plugin. Every method has a default, so implement only what you export.
/// Calls must be pure functions of their input and the settings: the host
/// memoizes answers and may run several instances.
pub trait Plugin: Default {
    /// Settings JSON from the ruleset, once per instance before any call.
    fn init(&mut self, _settings: &str) -> Result<(), String> {
        Ok(())
    }

    /// Identity labels for a workload, merged over its own labels.
    fn resolve(&mut self, _workload: &Workload) -> Result<Labels, String> {
        Ok(Labels::new())
    }

    /// Consulted where a rule says `ask`.
    fn decide(&mut self, _query: &Query, _identities: &Identities) -> Verdict {
        Verdict::Abstain
    }
}

/// The instance's state. wasm32-unknown-unknown runs one thread per
/// instance, so an unsynchronized cell is sound there.
#[doc(hidden)]
pub struct Slot<T>(UnsafeCell<Option<(T, Identities)>>);

// SAFETY: plugins run on a single-threaded wasm instance; the host never
// calls into one instance from two threads.
unsafe impl<T> Sync for Slot<T> {}

impl<T: Plugin> Default for Slot<T> {
    fn default() -> Self {
        Slot::new()
    }
}

impl<T: Plugin> Slot<T> {
    pub const fn new() -> Self {
        Slot(UnsafeCell::new(None))
    }

    #[allow(clippy::mut_from_ref)]
    fn get(&self) -> &mut (T, Identities) {
        // SAFETY: see `Sync` above; exports do not re-enter each other.
        unsafe { (*self.0.get()).get_or_insert_with(Default::default) }
    }
}

/// The glue the macro expands to; not for direct use.
#[doc(hidden)]
pub mod rt {
    use super::*;
    use std::alloc::{Layout, alloc, dealloc};

    pub fn alloc_bytes(len: i32) -> i32 {
        match Layout::from_size_align(len.max(1) as usize, 1) {
            // SAFETY: a non-zero size with alignment 1.
            Ok(l) => unsafe { alloc(l) as i32 },
            Err(_) => 0,
        }
    }

    pub fn free_bytes(ptr: i32, len: i32) {
        if ptr == 0 {
            return;
        }
        if let Ok(l) = Layout::from_size_align(len.max(1) as usize, 1) {
            // SAFETY: the host frees only what alloc_bytes or `emit` handed out, with its length.
            unsafe { dealloc(ptr as *mut u8, l) }
        }
    }

    fn input<'a>(ptr: i32, len: i32) -> &'a [u8] {
        // SAFETY: the host wrote `len` bytes at `ptr`, in a buffer it got from alloc_bytes.
        unsafe { std::slice::from_raw_parts(ptr as *const u8, len as usize) }
    }

    /// Hands a buffer to the host as (ptr << 32 | len); the host frees it.
    fn emit(bytes: Vec<u8>) -> i64 {
        let len = bytes.len();
        if len == 0 {
            return 0;
        }
        let ptr = Box::into_raw(bytes.into_boxed_slice()) as *mut u8 as u32;
        ((ptr as i64) << 32) | len as i64
    }

    pub fn log(level: i32, msg: &str) {
        #[cfg(target_arch = "wasm32")]
        {
            #[link(wasm_import_module = "trireme")]
            unsafe extern "C" {
                #[link_name = "log"]
                fn host_log(level: i32, ptr: i32, len: i32);
            }
            // SAFETY: the host reads `len` bytes at `ptr` during the call.
            unsafe { host_log(level, msg.as_ptr() as i32, msg.len() as i32) }
        }
        #[cfg(not(target_arch = "wasm32"))]
        let _ = (level, msg);
    }

    pub fn init<T: Plugin>(slot: &Slot<T>, ptr: i32, len: i32) -> i32 {
        let Ok(s) = std::str::from_utf8(input(ptr, len)) else {
            log(0, "settings are not UTF-8");
            return 1;
        };
        match slot.get().0.init(s) {
            Ok(()) => 0,
            Err(e) => {
                log(0, &format!("bad settings: {e}"));
                1
            }
        }
    }

    pub fn resolve<T: Plugin>(slot: &Slot<T>, ptr: i32, len: i32) -> i64 {
        let w: Workload = match serde_json::from_slice(input(ptr, len)) {
            Ok(w) => w,
            Err(e) => {
                log(0, &format!("bad workload JSON: {e}"));
                return -1;
            }
        };
        match slot.get().0.resolve(&w) {
            Ok(l) if l.is_empty() => 0,
            Ok(l) => emit(serde_json::to_vec(&l).expect("labels serialize")),
            Err(e) => {
                log(0, &e);
                -2
            }
        }
    }

    pub fn identity<T: Plugin>(slot: &Slot<T>, id: i64, ptr: i32, len: i32) {
        match serde_json::from_slice::<Labels>(input(ptr, len)) {
            Ok(l) => {
                slot.get().1.0.insert(id as u64, l);
            }
            Err(e) => log(1, &format!("bad identity JSON: {e}")),
        }
    }

    pub fn decide<T: Plugin>(slot: &Slot<T>, ptr: i32) -> i32 {
        let q = Query::decode(input(ptr, 64).try_into().expect("64 bytes"));
        let (p, ids) = slot.get();
        p.decide(&q, ids) as i32
    }

    /// The metadata section's bytes, built at compile time.
    pub const fn metadata<const N: usize>(json: &str) -> [u8; N] {
        let b = json.as_bytes();
        let mut out = [0u8; N];
        let mut i = 0;
        while i < N {
            out[i] = b[i];
            i += 1;
        }
        out
    }
}

/// Logs through the host (`trireme.log`): 0 error, 1 warn, 2 info, 3 debug.
pub fn log(level: i32, msg: &str) {
    rt::log(level, msg)
}

/// Exports a [`Plugin`] type under ABI v1, with its metadata section.
/// `hooks` lists what to export: `resolve`, `decide`, or both.
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty, name: $name:literal, version: $version:literal, hooks: [$($hook:ident),+ $(,)?]) => {
        static __TRIREME_SLOT: $crate::Slot<$ty> = $crate::Slot::new();

        const __TRIREME_META_JSON: &str = concat!(
            "{\"name\":\"", $name, "\",\"version\":\"", $version, "\",\"abi\":1}"
        );
        #[cfg(target_arch = "wasm32")]
        #[used]
        #[unsafe(link_section = "trireme.plugin")]
        static __TRIREME_META: [u8; __TRIREME_META_JSON.len()] =
            $crate::rt::metadata(__TRIREME_META_JSON);

        #[unsafe(no_mangle)]
        pub extern "C" fn trireme_abi_version() -> i32 {
            1
        }
        #[unsafe(no_mangle)]
        pub extern "C" fn trireme_alloc(len: i32) -> i32 {
            $crate::rt::alloc_bytes(len)
        }
        #[unsafe(no_mangle)]
        pub extern "C" fn trireme_free(ptr: i32, len: i32) {
            $crate::rt::free_bytes(ptr, len)
        }
        #[unsafe(no_mangle)]
        pub extern "C" fn trireme_init(ptr: i32, len: i32) -> i32 {
            $crate::rt::init(&__TRIREME_SLOT, ptr, len)
        }
        $( $crate::export_plugin!(@hook $hook); )+
    };
    (@hook resolve) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn trireme_resolve(ptr: i32, len: i32) -> i64 {
            $crate::rt::resolve(&__TRIREME_SLOT, ptr, len)
        }
    };
    (@hook decide) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn trireme_decide(ptr: i32) -> i32 {
            $crate::rt::decide(&__TRIREME_SLOT, ptr)
        }
        #[unsafe(no_mangle)]
        pub extern "C" fn trireme_identity(id: i64, ptr: i32, len: i32) {
            $crate::rt::identity(&__TRIREME_SLOT, id, ptr, len)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decodes_the_abi_layout() {
        let mut b = [0u8; 64];
        b[0] = 7;
        b[8] = 9;
        b[26..32].copy_from_slice(&[0xff, 0xff, 198, 18, 0, 1]);
        b[48..50].copy_from_slice(&443u16.to_le_bytes());
        b[50] = 6;
        b[51] = 1;
        let q = Query::decode(&b);
        assert_eq!((q.src_id, q.dst_id, q.port, q.protocol), (7, 9, 443, 6));
        assert_eq!(q.src_ip, Some("198.18.0.1".parse().unwrap()));
        assert_eq!(q.dst_ip, None);
        assert_eq!(q.direction, Direction::Egress);
    }

    #[test]
    fn workload_json_is_camel_case_and_lenient_on_missing_fields() {
        let w: Workload = serde_json::from_str(
            r#"{"kind":"pod","name":"a","namespaceLabels":{"x":"1"},"images":["nginx"]}"#,
        )
        .unwrap();
        assert_eq!(w.namespace_labels["x"], "1");
        assert_eq!(w.images, ["nginx"]);
        assert!(w.annotations.is_empty());
    }
}
