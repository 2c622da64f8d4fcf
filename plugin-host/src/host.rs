//! The engine side: one wasmtime engine per host, configured for the
//! budget kind; compiled modules cached in memory and on disk; the single
//! import a guest may have.

use crate::abi;
use crate::error::LoadError;
use crate::limits::{Budget, Limits};
use crate::plugin::{self, Plugin};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::{Caller, Config, Engine, Linker, Module, StoreLimits};

/// Log severity a guest passes to `trireme.log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    fn from_code(c: i32) -> Level {
        match c {
            0 => Level::Error,
            1 => Level::Warn,
            2 => Level::Info,
            _ => Level::Debug,
        }
    }
}

/// Where plugin messages (the guest's own logs and the host's reports about
/// the guest) go: (plugin name, level, message).
pub type LogSink = Arc<dyn Fn(&str, Level, &str) + Send + Sync>;

fn stderr_sink() -> LogSink {
    Arc::new(|plugin, level, msg| eprintln!("plugin {plugin}: {level:?}: {msg}"))
}

/// Per-store data: the memory limiter and who is talking.
pub(crate) struct State {
    pub limits: StoreLimits,
    pub plugin: Arc<str>,
    pub log: LogSink,
    /// Guest log lines left for this instance (a chatty guest cannot flood).
    pub logs_left: u32,
}

/// Longest guest log line kept.
const LOG_LINE_MAX: usize = 1024;
/// Guest log lines per instance.
pub(crate) const LOGS_PER_INSTANCE: u32 = 64;

pub(crate) struct Inner {
    pub engine: Engine,
    pub linker: Linker<State>,
    pub limits: Limits,
    pub log: LogSink,
    cache_dir: Option<PathBuf>,
    modules: Mutex<HashMap<[u8; 32], Module>>,
    /// Stops the epoch ticker when the host goes away.
    _ticker: Option<Ticker>,
}

struct Ticker(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Loads plugins. Cheap to clone; plugins keep their host alive.
#[derive(Clone)]
pub struct Host {
    pub(crate) inner: Arc<Inner>,
}

/// Epoch tick: the deadline's resolution.
const TICK: Duration = Duration::from_millis(1);

impl Host {
    pub fn new(limits: Limits) -> Result<Host, String> {
        Host::build(limits, None, stderr_sink())
    }

    /// `cache_dir`: where compiled modules are kept between runs. Only this
    /// process's own output is ever read back from it, so it must not be
    /// writable by anyone less trusted than the process.
    pub fn build(limits: Limits, cache_dir: Option<PathBuf>, log: LogSink) -> Result<Host, String> {
        let mut cfg = Config::new();
        cfg.max_wasm_stack(limits.stack_bytes);
        match limits.budget {
            Budget::Fuel(_) => {
                cfg.consume_fuel(true);
            }
            Budget::Deadline(_) => {
                cfg.epoch_interruption(true);
            }
        }
        let engine = Engine::new(&cfg).map_err(|e| format!("wasm engine: {e}"))?;
        let mut linker = Linker::new(&engine);
        linker
            .func_wrap(abi::IMPORT_MODULE, abi::IMPORT_LOG, guest_log)
            .map_err(|e| format!("wasm linker: {e}"))?;
        let ticker = match limits.budget {
            Budget::Deadline(_) => Some(start_ticker(&engine)),
            Budget::Fuel(_) => None,
        };
        if let Some(d) = &cache_dir {
            std::fs::create_dir_all(d).map_err(|e| format!("plugin cache {}: {e}", d.display()))?;
        }
        Ok(Host {
            inner: Arc::new(Inner {
                engine,
                linker,
                limits,
                log,
                cache_dir,
                modules: Mutex::new(HashMap::new()),
                _ticker: ticker,
            }),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Validates, compiles (or fetches from the cache) and starts a plugin:
    /// a module that breaks the ABI is refused here, before any call.
    /// `pinned`: the sha256 the ruleset recorded; a different module is refused.
    pub fn load(
        &self,
        name: &str,
        wasm: &[u8],
        pinned: Option<[u8; 32]>,
        settings: Option<&str>,
    ) -> Result<Plugin, LoadError> {
        let sha: [u8; 32] = Sha256::digest(wasm).into();
        if let Some(p) = pinned
            && p != sha
        {
            return Err(LoadError::Digest {
                plugin: name.into(),
                expected: hex(&p),
                actual: hex(&sha),
            });
        }
        let module = self
            .module(wasm, sha)
            .map_err(|message| LoadError::Invalid {
                plugin: name.into(),
                message,
            })?;
        plugin::start(self.inner.clone(), name, sha, wasm, module, settings)
    }

    /// The compiled module for these bytes: from memory, from the disk cache,
    /// or compiled now (and then cached in both).
    fn module(&self, wasm: &[u8], sha: [u8; 32]) -> Result<Module, String> {
        if let Some(m) = self.inner.modules.lock().expect("poisoned").get(&sha) {
            return Ok(m.clone());
        }
        let engine = &self.inner.engine;
        let file = self.inner.cache_dir.as_ref().map(|d| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            d.join(format!("{}-{:016x}.cwasm", hex(&sha), h.finish()))
        });
        // Read, not mapped: a file truncated under a mapping would kill the
        // process with SIGBUS.
        let cached = file
            .as_deref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|bytes| {
                // SAFETY: wasmtime trusts serialized modules. The cache holds
                // only what `store_cached` below wrote for this engine
                // configuration, keyed by the source's sha256 and the engine's
                // compatibility hash, in a directory the operator gives to
                // this process alone; a stale or foreign file fails wasmtime's
                // own header check and is recompiled.
                unsafe { Module::deserialize(engine, &bytes) }.ok()
            });
        let module = match cached {
            Some(m) => m,
            None => {
                let m = Module::new(engine, wasm).map_err(|e| format!("{e:#}"))?;
                if let Some(f) = &file {
                    store_cached(&m, f);
                }
                m
            }
        };
        self.inner
            .modules
            .lock()
            .expect("poisoned")
            .insert(sha, module.clone());
        Ok(module)
    }
}

/// Best effort: a cache that cannot be written only costs a recompile.
fn store_cached(m: &Module, file: &Path) {
    if let Ok(bytes) = m.serialize() {
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, file);
        }
    }
}

fn start_ticker(engine: &Engine) -> Ticker {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let weak = engine.weak();
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("trireme-wasm-epoch".into())
        .spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => break,
                }
            }
        })
        .expect("spawning the epoch thread");
    Ticker(stop)
}

/// Deadline in epoch ticks (at least two: the current tick may be nearly over).
pub(crate) fn deadline_ticks(d: Duration) -> u64 {
    (d.as_millis() as u64 / TICK.as_millis() as u64).max(1) + 1
}

/// `trireme.log`: the one thing a guest may ask of the host. Bad pointers
/// are ignored rather than trapped: logging must never change a verdict.
fn guest_log(mut caller: Caller<'_, State>, level: i32, ptr: i32, len: i32) {
    if caller.data().logs_left == 0 {
        return;
    }
    caller.data_mut().logs_left -= 1;
    let Some(mem) = caller
        .get_export(abi::EXPORT_MEMORY)
        .and_then(|e| e.into_memory())
    else {
        return;
    };
    let (start, len) = (ptr as u32 as usize, (len as u32 as usize).min(LOG_LINE_MAX));
    let data = mem.data(&caller);
    let Some(bytes) = start.checked_add(len).and_then(|end| data.get(start..end)) else {
        return;
    };
    let msg = String::from_utf8_lossy(bytes).into_owned();
    let st = caller.data();
    let suffix = if st.logs_left == 0 {
        " (further messages from this instance suppressed)"
    } else {
        ""
    };
    (st.log)(
        &st.plugin,
        Level::from_code(level),
        &format!("{msg}{suffix}"),
    );
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
