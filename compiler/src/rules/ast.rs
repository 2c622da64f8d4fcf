//! The rule language's syntax tree. Positions are byte offsets into the
//! source text (for diagnostics); equality ignores them, so that a
//! formatted file parses back to an equal tree.

use crate::model::{Action, Direction, Protocol};

/// A byte offset, ignored by comparisons.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pos(pub usize);

impl PartialEq for Pos {
    fn eq(&self, _: &Pos) -> bool {
        true
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct File {
    pub policies: Vec<PolicyAst>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierAst {
    Admin,
    Namespace,
    Baseline,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PolicyAst {
    pub pos: Pos,
    pub name: String,
    pub name_pos: Pos,
    pub tier: Option<TierAst>,
    pub priority: Option<(i64, Pos)>,
    /// Empty: every workload.
    pub select: Vec<ReqAst>,
    pub rules: Vec<RuleAst>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReqKind {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReqAst {
    pub pos: Pos,
    pub key: String,
    pub kind: ReqKind,
}

/// `allow`, `deny`, `pass`, `ask PLUGIN`, or `isolate` (namespace tier:
/// govern a direction without allowing anything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    Act(Action),
    /// A decide plugin, by name.
    Ask(String),
    Isolate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuleAst {
    pub pos: Pos,
    pub verb: Verb,
    pub direction: Direction,
    /// `None`: any peer.
    pub peers: Option<Vec<PeerAst>>,
    /// Empty: every port.
    pub ports: Vec<PortAst>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PeerAst {
    /// Workloads matching these requirements (empty: every workload).
    Labels(Vec<ReqAst>),
    Cidr {
        pos: Pos,
        cidr: String,
        except: Vec<(String, Pos)>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum PortSpec {
    Any,
    Range(u32, u32),
    Named(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PortAst {
    pub pos: Pos,
    pub protocol: Protocol,
    pub spec: PortSpec,
}
