//! Errors name the plugin and say what the guest did wrong, so that a
//! plugin author can fix it from the message alone.

/// Why a module was refused at load. Nothing of a refused module runs
/// beyond its start-up exports.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {plugin}: not a valid WebAssembly module: {message}")]
    Invalid { plugin: String, message: String },
    #[error(
        "plugin {plugin}: imports {module}.{name}, but ABI v1 allows only trireme.log(level: i32, ptr: i32, len: i32)"
    )]
    ForbiddenImport {
        plugin: String,
        module: String,
        name: String,
    },
    #[error("plugin {plugin}: missing export `{export}` (ABI v1 requires it)")]
    MissingExport {
        plugin: String,
        export: &'static str,
    },
    #[error("plugin {plugin}: export `{export}` has the wrong type: expected {expected}")]
    ExportType {
        plugin: String,
        export: &'static str,
        expected: &'static str,
    },
    #[error(
        "plugin {plugin}: exports neither trireme_resolve nor trireme_decide: it can do nothing"
    )]
    NoHooks { plugin: String },
    #[error("plugin {plugin}: ABI version {found}, this host speaks version 1")]
    AbiVersion { plugin: String, found: i64 },
    #[error("plugin {plugin}: bad `trireme.plugin` metadata section: {message}")]
    Metadata { plugin: String, message: String },
    #[error(
        "plugin {plugin}: settings given, but the module exports no trireme_init to receive them"
    )]
    SettingsWithoutInit { plugin: String },
    #[error("plugin {plugin}: sha256 is {actual}, but {expected} was pinned")]
    Digest {
        plugin: String,
        expected: String,
        actual: String,
    },
    #[error("plugin {plugin}: start-up failed: {source}")]
    Startup {
        plugin: String,
        #[source]
        source: CallError,
    },
}

/// Why one call failed. The caller treats every one of these as a failure
/// of the plugin (fail-closed), never as an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("ran out of its time budget (infinite loop?)")]
    Timeout,
    #[error("exhausted its stack (runaway recursion?)")]
    StackOverflow,
    #[error("exceeded its memory limit of {0} bytes")]
    Memory(usize),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned bad output: {0}")]
    BadOutput(String),
    #[error("refused the input (error code {0})")]
    Refused(i64),
    #[error("does not export {0}")]
    NotExported(&'static str),
}

impl CallError {
    /// Stable short name, for counters and log-once keys.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Timeout => "timeout",
            CallError::StackOverflow => "stack_overflow",
            CallError::Memory(_) => "memory",
            CallError::Trap(_) => "trap",
            CallError::BadOutput(_) => "bad_output",
            CallError::Refused(_) => "refused",
            CallError::NotExported(_) => "not_exported",
        }
    }
}
