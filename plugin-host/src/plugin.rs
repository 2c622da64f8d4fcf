//! One loaded plugin: a validated module, a pool of live instances, memos
//! of its answers and counters of its failures.
//!
//! Instances are reused (instantiation costs far more than a call) and
//! recycled: after a failure, since the guest's state may be half-updated,
//! and after `recycle_after` calls, since a leaking guest would otherwise
//! reach its memory cap. ABI v1 makes `resolve` and `decide` pure functions of
//! their input (and the settings), so answers are memoized.

use crate::abi::{self, Metadata, Query, Verdict};
use crate::error::{CallError, LoadError};
use crate::host::{self, Inner, Level, State};
use crate::limits::Budget;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::{
    ExternType, FuncType, Instance, Memory, Module, Store, StoreLimitsBuilder, Trap, TypedFunc,
    ValType, WasmParams, WasmResults,
};

pub type Labels = BTreeMap<String, String>;

/// Which optional parts of the ABI the module implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks {
    pub init: bool,
    pub resolve: bool,
    pub decide: bool,
    pub identity: bool,
}

/// Counters, read with [`Plugin::stats`].
#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    memo_hits: AtomicU64,
    instances: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Calls that reached the guest.
    pub calls: u64,
    /// Calls answered from the memo.
    pub memo_hits: u64,
    /// Instances created (the first one, then one per recycle).
    pub instances: u64,
    /// Failures by kind (`CallError::kind`).
    pub failures: BTreeMap<&'static str, u64>,
}

pub struct Plugin {
    host: Arc<Inner>,
    name: Arc<str>,
    sha256: [u8; 32],
    size: usize,
    metadata: Option<Metadata>,
    hooks: Hooks,
    settings: Option<String>,
    module: Module,
    pool: Mutex<Vec<Live>>,
    memo_decide: Mutex<HashMap<[u8; abi::QUERY_LEN], Verdict>>,
    memo_resolve: Mutex<HashMap<String, Labels>>,
    counters: Counters,
    /// Failure kinds already logged: each is logged once per plugin.
    reported: Mutex<HashSet<&'static str>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("sha256", &host::hex(&self.sha256))
            .field("hooks", &self.hooks)
            .finish()
    }
}

/// A live instance and its exports, typed once.
struct Live {
    store: Store<State>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    free: TypedFunc<(i32, i32), ()>,
    resolve: Option<TypedFunc<(i32, i32), i64>>,
    decide: Option<TypedFunc<i32, i32>>,
    identity: Option<TypedFunc<(i64, i32, i32), ()>>,
    /// Host-owned input buffer in guest memory (ptr, capacity).
    input: Option<(u32, u32)>,
    /// The query struct's place in guest memory.
    query: Option<u32>,
    /// Identity ids already announced to this instance.
    known: HashSet<u64>,
    calls: u64,
}

/// Validates a module against ABI v1 without running it.
fn validate(
    name: &str,
    module: &Module,
    wasm: &[u8],
) -> Result<(Hooks, Option<Metadata>), LoadError> {
    for imp in module.imports() {
        let ok = imp.module() == abi::IMPORT_MODULE
            && imp.name() == abi::IMPORT_LOG
            && matches!(imp.ty(), ExternType::Func(f) if sig(&f) == "iii->");
        if !ok {
            return Err(LoadError::ForbiddenImport {
                plugin: name.into(),
                module: imp.module().into(),
                name: imp.name().into(),
            });
        }
    }
    let exports: HashMap<&str, ExternType> = module.exports().map(|e| (e.name(), e.ty())).collect();
    let func =
        |export: &'static str, expected: &'static str, required: bool| match exports.get(export) {
            None if required => Err(LoadError::MissingExport {
                plugin: name.into(),
                export,
            }),
            None => Ok(false),
            Some(ExternType::Func(f)) if sig(f) == expected => Ok(true),
            Some(_) => Err(LoadError::ExportType {
                plugin: name.into(),
                export,
                expected: signature_text(expected),
            }),
        };
    match exports.get(abi::EXPORT_MEMORY) {
        Some(ExternType::Memory(m)) if !m.is_64() && !m.is_shared() => {}
        Some(_) => {
            return Err(LoadError::ExportType {
                plugin: name.into(),
                export: abi::EXPORT_MEMORY,
                expected: "a 32-bit, unshared memory",
            });
        }
        None => {
            return Err(LoadError::MissingExport {
                plugin: name.into(),
                export: abi::EXPORT_MEMORY,
            });
        }
    }
    func(abi::EXPORT_ABI_VERSION, "->i", true)?;
    func(abi::EXPORT_ALLOC, "i->i", true)?;
    func(abi::EXPORT_FREE, "ii->", true)?;
    let hooks = Hooks {
        init: func(abi::EXPORT_INIT, "ii->i", false)?,
        resolve: func(abi::EXPORT_RESOLVE, "ii->I", false)?,
        decide: func(abi::EXPORT_DECIDE, "i->i", false)?,
        identity: func(abi::EXPORT_IDENTITY, "Iii->", false)?,
    };
    if !hooks.resolve && !hooks.decide {
        return Err(LoadError::NoHooks {
            plugin: name.into(),
        });
    }
    Ok((hooks, metadata(name, wasm)?))
}

/// `trireme.plugin`, if present, must be well-formed and agree on the ABI.
fn metadata(name: &str, wasm: &[u8]) -> Result<Option<Metadata>, LoadError> {
    let err = |message: String| LoadError::Metadata {
        plugin: name.into(),
        message,
    };
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let Ok(wasmparser::Payload::CustomSection(s)) = payload else {
            continue;
        };
        if s.name() != abi::METADATA_SECTION {
            continue;
        }
        let m: Metadata = serde_json::from_slice(s.data()).map_err(|e| err(e.to_string()))?;
        if m.abi != abi::ABI_VERSION {
            return Err(err(format!("declares ABI {}, this host speaks 1", m.abi)));
        }
        return Ok(Some(m));
    }
    Ok(None)
}

/// A compact signature: `i` i32, `I` i64, `?` anything else.
fn sig(f: &FuncType) -> String {
    let t = |v: ValType| match v {
        ValType::I32 => 'i',
        ValType::I64 => 'I',
        _ => '?',
    };
    let mut s: String = f.params().map(t).collect();
    s.push_str("->");
    s.extend(f.results().map(t));
    s
}

fn signature_text(sig: &str) -> &'static str {
    match sig {
        "->i" => "() -> i32",
        "i->i" => "(i32) -> i32",
        "ii->" => "(i32, i32) -> ()",
        "ii->i" => "(i32, i32) -> i32",
        "ii->I" => "(i32, i32) -> i64",
        "Iii->" => "(i64, i32, i32) -> ()",
        _ => "see docs/plugin-abi.md",
    }
}

/// An export whose type `validate` checked at load: the lookup cannot fail.
fn export<P: WasmParams, R: WasmResults>(
    inst: &Instance,
    store: &mut Store<State>,
    name: &str,
) -> TypedFunc<P, R> {
    inst.get_typed_func(store, name).expect("validated at load")
}

/// Maps a wasmtime failure onto what the guest did.
fn classify(e: wasmtime::Error, memory_cap: usize) -> CallError {
    if let Some(t) = e.downcast_ref::<Trap>() {
        return match t {
            Trap::OutOfFuel | Trap::Interrupt => CallError::Timeout,
            Trap::StackOverflow => CallError::StackOverflow,
            other => CallError::Trap(other.to_string()),
        };
    }
    let text = format!("{e:#}");
    if text.contains("growing memory")
        || text.contains("memory growth")
        || text.contains("memory minimum size")
    {
        return CallError::Memory(memory_cap);
    }
    CallError::Trap(text)
}

pub(crate) fn start(
    host: Arc<Inner>,
    name: &str,
    sha256: [u8; 32],
    wasm: &[u8],
    module: Module,
    settings: Option<&str>,
) -> Result<Plugin, LoadError> {
    let (hooks, metadata) = validate(name, &module, wasm)?;
    if settings.is_some() && !hooks.init {
        return Err(LoadError::SettingsWithoutInit {
            plugin: name.into(),
        });
    }
    let plugin = Plugin {
        host,
        name: name.into(),
        sha256,
        size: wasm.len(),
        metadata,
        hooks,
        settings: settings.map(String::from),
        module,
        pool: Mutex::new(Vec::new()),
        memo_decide: Mutex::new(HashMap::new()),
        memo_resolve: Mutex::new(HashMap::new()),
        counters: Counters::default(),
        reported: Mutex::new(HashSet::new()),
    };
    // One instance now: a wrong ABI version or failing init is a load error.
    let live = plugin.instantiate().map_err(|e| match e {
        Startup::Abi(found) => LoadError::AbiVersion {
            plugin: name.into(),
            found,
        },
        Startup::Call(source) => LoadError::Startup {
            plugin: name.into(),
            source,
        },
    })?;
    plugin.pool.lock().expect("poisoned").push(live);
    Ok(plugin)
}

enum Startup {
    Abi(i64),
    Call(CallError),
}

impl From<CallError> for Startup {
    fn from(e: CallError) -> Self {
        Startup::Call(e)
    }
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn hooks(&self) -> Hooks {
        self.hooks
    }

    pub fn metadata(&self) -> Option<&Metadata> {
        self.metadata.as_ref()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            calls: self.counters.calls.load(Ordering::Relaxed),
            memo_hits: self.counters.memo_hits.load(Ordering::Relaxed),
            instances: self.counters.instances.load(Ordering::Relaxed),
            failures: self.counters.failures.lock().expect("poisoned").clone(),
        }
    }

    /// Workload metadata (JSON, see docs/plugin-abi.md) → identity labels.
    pub fn resolve(&self, workload_json: &str) -> Result<Labels, CallError> {
        if !self.hooks.resolve {
            return Err(CallError::NotExported(abi::EXPORT_RESOLVE));
        }
        let limits = &self.host.limits;
        let memo = limits.memo_entries > 0;
        if memo
            && let Some(l) = self
                .memo_resolve
                .lock()
                .expect("poisoned")
                .get(workload_json)
        {
            self.counters.memo_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(l.clone());
        }
        let labels = self.with_live(|live| {
            let (ptr, len) = live.write_input(workload_json.as_bytes(), limits.memory_bytes)?;
            let f = live.resolve.clone().expect("checked at load");
            let packed = f
                .call(&mut live.store, (ptr as i32, len as i32))
                .map_err(|e| classify(e, limits.memory_bytes))?;
            if packed < 0 {
                return Err(CallError::Refused(packed));
            }
            if packed == 0 {
                return Ok(Labels::new());
            }
            let (out_ptr, out_len) = ((packed as u64 >> 32) as u32, packed as u32);
            if out_len as usize > limits.max_output {
                return Err(CallError::BadOutput(format!(
                    "{out_len} bytes of output, the limit is {}",
                    limits.max_output
                )));
            }
            let bytes = live.read(out_ptr, out_len)?;
            live.free
                .call(&mut live.store, (out_ptr as i32, out_len as i32))
                .map_err(|e| classify(e, limits.memory_bytes))?;
            parse_labels(&bytes, limits.max_labels)
        })?;
        if memo {
            let mut m = self.memo_resolve.lock().expect("poisoned");
            if m.len() >= limits.memo_entries {
                m.clear();
            }
            m.insert(workload_json.to_string(), labels.clone());
        }
        Ok(labels)
    }

    /// Asks the `decide` hook. `labels_of` gives the labels JSON of an
    /// identity id the instance has not seen yet (only called when the guest
    /// exports `trireme_identity`).
    pub fn decide(
        &self,
        q: &Query,
        labels_of: &mut dyn FnMut(u64) -> Option<String>,
    ) -> Result<Verdict, CallError> {
        if !self.hooks.decide {
            return Err(CallError::NotExported(abi::EXPORT_DECIDE));
        }
        let key = q.encode();
        let memo = self.host.limits.memo_entries > 0;
        if memo && let Some(v) = self.memo_decide.lock().expect("poisoned").get(&key) {
            self.counters.memo_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(*v);
        }
        let cap = self.host.limits.memory_bytes;
        let verdict = self.with_live(|live| {
            if live.identity.is_some() {
                for id in [q.src_id, q.dst_id] {
                    if id != 0 && !live.known.contains(&id) {
                        if let Some(json) = labels_of(id) {
                            let (ptr, len) = live.write_input(json.as_bytes(), cap)?;
                            let f = live.identity.clone().expect("checked");
                            f.call(&mut live.store, (id as i64, ptr as i32, len as i32))
                                .map_err(|e| classify(e, cap))?;
                        }
                        live.known.insert(id);
                    }
                }
            }
            let at = live.query.expect("allocated when decide is exported");
            live.memory
                .write(&mut live.store, at as usize, &key)
                .map_err(|_| CallError::BadOutput("query buffer outside memory".into()))?;
            let f = live.decide.clone().expect("checked at load");
            let code = f
                .call(&mut live.store, at as i32)
                .map_err(|e| classify(e, cap))?;
            Verdict::from_code(code).ok_or_else(|| {
                CallError::BadOutput(format!("decide returned {code}; expected 0, 1 or 2"))
            })
        })?;
        if memo {
            let mut m = self.memo_decide.lock().expect("poisoned");
            if m.len() >= self.host.limits.memo_entries {
                m.clear();
            }
            m.insert(key, verdict);
        }
        Ok(verdict)
    }

    /// Runs `f` on a pooled instance (making one if none is free). A failed
    /// instance is dropped, the failure counted and, once per kind, logged.
    fn with_live<T>(
        &self,
        f: impl FnOnce(&mut Live) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let pooled = self.pool.lock().expect("poisoned").pop();
        let mut live = match pooled {
            Some(l) => l,
            None => self
                .instantiate()
                .map_err(|e| match e {
                    Startup::Abi(v) => CallError::BadOutput(format!("ABI version changed to {v}")),
                    Startup::Call(c) => c,
                })
                .inspect_err(|e| self.failed(e))?,
        };
        self.arm(&mut live.store);
        match f(&mut live) {
            Ok(v) => {
                live.calls += 1;
                if live.calls < self.host.limits.recycle_after {
                    self.pool.lock().expect("poisoned").push(live);
                }
                Ok(v)
            }
            Err(e) => {
                self.failed(&e);
                Err(e)
            }
        }
    }

    fn failed(&self, e: &CallError) {
        *self
            .counters
            .failures
            .lock()
            .expect("poisoned")
            .entry(e.kind())
            .or_default() += 1;
        if self.reported.lock().expect("poisoned").insert(e.kind()) {
            (self.host.log)(
                &self.name,
                Level::Error,
                &format!(
                    "{e} (failing closed; further {} failures are only counted)",
                    e.kind()
                ),
            );
        }
    }

    fn instantiate(&self) -> Result<Live, Startup> {
        let limits = &self.host.limits;
        let cap = limits.memory_bytes;
        let state = State {
            limits: StoreLimitsBuilder::new()
                .memory_size(cap)
                .memories(1)
                .instances(1)
                .tables(4)
                .table_elements(65_536)
                .trap_on_grow_failure(true)
                .build(),
            plugin: self.name.clone(),
            log: self.host.log.clone(),
            logs_left: host::LOGS_PER_INSTANCE,
        };
        let mut store = Store::new(&self.host.engine, state);
        store.limiter(|s| &mut s.limits);
        if matches!(limits.budget, Budget::Deadline(_)) {
            store.epoch_deadline_trap();
        }
        self.arm(&mut store);
        let inst = self
            .host
            .linker
            .instantiate(&mut store, &self.module)
            .map_err(|e| classify(e, cap))?;
        let memory = inst
            .get_memory(&mut store, abi::EXPORT_MEMORY)
            .expect("validated at load");
        let version = export::<(), i32>(&inst, &mut store, abi::EXPORT_ABI_VERSION)
            .call(&mut store, ())
            .map_err(|e| classify(e, cap))?;
        if version != abi::ABI_VERSION {
            return Err(Startup::Abi(version.into()));
        }
        let alloc = export(&inst, &mut store, abi::EXPORT_ALLOC);
        let free = export(&inst, &mut store, abi::EXPORT_FREE);
        let h = self.hooks;
        let resolve = h
            .resolve
            .then(|| export(&inst, &mut store, abi::EXPORT_RESOLVE));
        let decide = h
            .decide
            .then(|| export(&inst, &mut store, abi::EXPORT_DECIDE));
        let identity = h
            .identity
            .then(|| export(&inst, &mut store, abi::EXPORT_IDENTITY));
        let init = h
            .init
            .then(|| export::<(i32, i32), i32>(&inst, &mut store, abi::EXPORT_INIT));
        let mut live = Live {
            store,
            memory,
            alloc,
            free,
            resolve,
            decide,
            identity,
            input: None,
            query: None,
            known: HashSet::new(),
            calls: 0,
        };
        if let (Some(init), Some(settings)) = (init, &self.settings) {
            let (ptr, len) = live.write_input(settings.as_bytes(), cap)?;
            let rc = init
                .call(&mut live.store, (ptr as i32, len as i32))
                .map_err(|e| classify(e, cap))?;
            if rc != 0 {
                return Err(CallError::Refused(rc.into()).into());
            }
        }
        if live.decide.is_some() {
            live.query = Some(live.guest_alloc(abi::QUERY_LEN as u32, cap)?);
        }
        self.counters.instances.fetch_add(1, Ordering::Relaxed);
        Ok(live)
    }

    fn arm(&self, store: &mut Store<State>) {
        match self.host.limits.budget {
            Budget::Fuel(n) => store.set_fuel(n).expect("fuel is enabled in fuel mode"),
            Budget::Deadline(d) => store.set_epoch_deadline(host::deadline_ticks(d)),
        }
    }
}

impl Live {
    /// Asks the guest for `len` bytes and checks the answer lies in memory.
    fn guest_alloc(&mut self, len: u32, cap: usize) -> Result<u32, CallError> {
        let ptr = self
            .alloc
            .call(&mut self.store, len as i32)
            .map_err(|e| classify(e, cap))? as u32;
        let size = self.memory.data_size(&self.store);
        if ptr == 0 || ptr as usize + len as usize > size {
            return Err(CallError::BadOutput(format!(
                "trireme_alloc({len}) returned {ptr}, outside its {size}-byte memory"
            )));
        }
        Ok(ptr)
    }

    /// Copies `data` into the host-owned input buffer, growing it as needed.
    fn write_input(&mut self, data: &[u8], cap: usize) -> Result<(u32, u32), CallError> {
        let len = u32::try_from(data.len())
            .map_err(|_| CallError::BadOutput("input too large".into()))?;
        let ptr = match self.input {
            Some((p, c)) if c >= len => p,
            old => {
                if let Some((p, c)) = old {
                    self.input = None;
                    self.free
                        .call(&mut self.store, (p as i32, c as i32))
                        .map_err(|e| classify(e, cap))?;
                }
                let c = len.max(256).next_power_of_two();
                let p = self.guest_alloc(c, cap)?;
                self.input = Some((p, c));
                p
            }
        };
        self.memory
            .write(&mut self.store, ptr as usize, data)
            .map_err(|_| CallError::BadOutput("input buffer outside memory".into()))?;
        Ok((ptr, len))
    }

    fn read(&self, ptr: u32, len: u32) -> Result<Vec<u8>, CallError> {
        let data = self.memory.data(&self.store);
        (ptr as usize)
            .checked_add(len as usize)
            .and_then(|end| data.get(ptr as usize..end))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| {
                CallError::BadOutput(format!(
                    "output at {ptr}+{len} lies outside its {}-byte memory",
                    data.len()
                ))
            })
    }
}

/// `resolve` output: a flat JSON object of string labels. Keys under the
/// reserved `@` prefix belong to the system and are refused, so a plugin can
/// never forge a namespace.
fn parse_labels(bytes: &[u8], max: usize) -> Result<Labels, CallError> {
    let bad = |m: String| CallError::BadOutput(m);
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(map) = v else {
        return Err(bad("expected a JSON object of labels".into()));
    };
    if map.len() > max {
        return Err(bad(format!("{} labels, the limit is {max}", map.len())));
    }
    let mut out = Labels::new();
    for (k, v) in map {
        let serde_json::Value::String(s) = v else {
            return Err(bad(format!("label {k:?} is not a string")));
        };
        if k.is_empty() || k.starts_with('@') {
            return Err(bad(format!(
                "label key {k:?} is empty or reserved (keys starting with @ are the system's)"
            )));
        }
        out.insert(k, s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_output_is_checked() {
        assert_eq!(
            parse_labels(br#"{"team":"a"}"#, 8).unwrap()["team"],
            "a".to_string()
        );
        for bad in [
            &br#"["team"]"#[..],
            br#"{"team":1}"#,
            br#"{"@namespace":"kube-system"}"#,
            br#"{"":"x"}"#,
            b"{",
        ] {
            assert!(matches!(parse_labels(bad, 8), Err(CallError::BadOutput(_))));
        }
        assert!(parse_labels(br#"{"a":"1","b":"2"}"#, 1).is_err());
    }
}
