//! Finding the policies whose subject selects an identity, without scanning.
//!
//! A decision first needs the policies that apply to both ends. With 10,000
//! policies a scan costs hundreds of microseconds, and even an index over
//! strings spends most of its time chasing heap pointers and comparing
//! strings. So every key and value that subject selectors mention is
//! interned once, at load; each subject selector is stored as one *anchor*
//! (an equality requirement, the namespace when there is one) plus its
//! remaining requirements in flat arrays of numbers, laid out bucket by
//! bucket so that the candidates for one anchor sit together in memory.
//! A lookup hashes the identity's labels once into a dense array indexed by
//! key (so a requirement is one array read, not a search), probes the
//! buckets of the keys that anchor some selector, and checks the remaining
//! requirements on integers.

use crate::model::{Direction, Identity, NAMESPACE_KEY, Operator, Peer, Peers, Policy};
use rustc_hash::FxHashMap as HashMap;
use std::ops::Range;

/// A value the index has never seen: it cannot satisfy `In`, and satisfies
/// `NotIn` and `Exists`.
const UNKNOWN: u32 = u32::MAX - 1;
/// The identity has no label with this key.
const ABSENT: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Req {
    key: u32,
    op: Operator,
    values: (u32, u32),
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    policy: u32,
    reqs: (u32, u32),
}

#[derive(Debug, Default, Clone)]
pub struct SubjectIndex {
    /// Keys are numbered densely (they index an encoded identity); values
    /// have their own numbering.
    keys: HashMap<Box<str>, u32>,
    values_ix: HashMap<Box<str>, u32>,
    /// Keys that anchor at least one bucket: the only ones a lookup probes.
    anchor_keys: Vec<u32>,
    buckets: HashMap<(u32, u32), (u32, u32)>,
    candidates: Vec<Candidate>,
    unanchored: Vec<Candidate>,
    reqs: Vec<Req>,
    values: Vec<u32>,
    /// Peer selectors of every rule, interned the same way, so that rule
    /// matching compares integers too. `peer_start[policy * 2 + dir]`
    /// indexes `rule_peer` (one entry per rule of that direction), which
    /// indexes `peer_reqs` (one requirement range per peer; CIDR peers get
    /// an empty range that is never consulted; so do node peers, matched on
    /// the few node label sets directly).
    peer_start: Vec<u32>,
    rule_peer: Vec<u32>,
    peer_reqs: Vec<(u32, u32)>,
}

/// An identity's labels as value symbols indexed by key symbol (`ABSENT`
/// where it has no such label, `UNKNOWN` for a value no selector names).
pub type Encoded = Vec<u32>;

fn range((start, end): (u32, u32)) -> Range<usize> {
    start as usize..end as usize
}

impl SubjectIndex {
    pub fn new(policies: &[Policy]) -> Self {
        let mut ix = SubjectIndex::default();
        // Anchor (key, value) → (policy, index of the anchor requirement).
        let mut grouped: std::collections::BTreeMap<(u32, u32), Vec<(u32, usize)>> =
            Default::default();
        let mut unanchored = Vec::new();
        // How many subjects require each (key, value): a policy is anchored
        // on its most selective equality, so that label-based policies
        // (`team = x, app = y` across namespaces) land in small buckets.
        let mut popularity: HashMap<(&str, &str), u32> = HashMap::default();
        for p in policies {
            for r in p
                .subject
                .requirements
                .iter()
                .filter(|r| r.op == Operator::In)
            {
                for v in &r.values {
                    *popularity.entry((&r.key, v)).or_default() += 1;
                }
            }
        }
        for (pi, p) in policies.iter().enumerate() {
            let reqs = &p.subject.requirements;
            let anchor = reqs
                .iter()
                .enumerate()
                .filter(|(_, r)| r.op == Operator::In)
                .min_by_key(|(_, r)| {
                    let size: u32 = r
                        .values
                        .iter()
                        .map(|v| popularity[&(r.key.as_str(), v.as_str())])
                        .sum();
                    (size, r.key != NAMESPACE_KEY)
                });
            match anchor {
                Some((ai, r)) => {
                    let k = ix.intern_key(&r.key);
                    for v in &r.values {
                        let v = ix.intern_value(v);
                        grouped.entry((k, v)).or_default().push((pi as u32, ai));
                    }
                }
                None => unanchored.push(pi as u32),
            }
        }
        for (anchor, members) in grouped {
            if ix.anchor_keys.last() != Some(&anchor.0) {
                ix.anchor_keys.push(anchor.0);
            }
            let start = ix.candidates.len() as u32;
            for (pi, ai) in members {
                let c = ix.compile(&policies[pi as usize], pi, Some(ai));
                ix.candidates.push(c);
            }
            ix.buckets
                .insert(anchor, (start, ix.candidates.len() as u32));
        }
        for pi in unanchored {
            let c = ix.compile(&policies[pi as usize], pi, None);
            ix.unanchored.push(c);
        }
        for p in policies {
            for dir in [Direction::Ingress, Direction::Egress] {
                ix.peer_start.push(ix.rule_peer.len() as u32);
                for r in p.rules(dir).into_iter().flatten() {
                    ix.rule_peer.push(ix.peer_reqs.len() as u32);
                    if let Peers::AnyOf(list) = &r.peers {
                        for peer in list {
                            let range = match peer {
                                Peer::Identity(sel) => ix.compile_reqs(&sel.requirements, None),
                                Peer::Cidr(_) | Peer::Nodes(_) => (0, 0),
                            };
                            ix.peer_reqs.push(range);
                        }
                    }
                }
            }
        }
        ix
    }

    /// `id`'s labels as symbols. Labels whose key no selector mentions
    /// cannot affect any requirement and are left out.
    pub fn encode(&self, id: &Identity) -> Encoded {
        let mut labels = vec![ABSENT; self.keys.len()];
        self.encode_into(id, &mut labels);
        labels
    }

    /// How many symbols an encoded identity has.
    pub fn width(&self) -> usize {
        self.keys.len()
    }

    /// As `encode`, into a buffer of `width()` symbols: a node encodes each
    /// token's peer once per decision, and a stack buffer spares it the
    /// allocation.
    pub fn encode_into(&self, id: &Identity, labels: &mut [u32]) {
        labels.fill(ABSENT);
        for (k, v) in id.iter() {
            if let Some(&k) = self.keys.get(k) {
                labels[k as usize] = self.values_ix.get(v).copied().unwrap_or(UNKNOWN);
            }
        }
    }

    /// Whether peer `k` of rule `rule` (direction `dir`) of policy `policy`
    /// — an identity selector — matches the encoded identity.
    pub fn peer_matches(
        &self,
        policy: u32,
        dir: Direction,
        rule: usize,
        k: usize,
        labels: &[u32],
    ) -> bool {
        let d = match dir {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        };
        let first_rule = self.peer_start[policy as usize * 2 + d] as usize;
        let first_peer = self.rule_peer[first_rule + rule] as usize;
        self.reqs_match(self.peer_reqs[first_peer + k], labels)
    }

    fn intern_key(&mut self, s: &str) -> u32 {
        let next = self.keys.len() as u32;
        *self.keys.entry(s.into()).or_insert(next)
    }

    fn intern_value(&mut self, s: &str) -> u32 {
        let next = self.values_ix.len() as u32;
        *self.values_ix.entry(s.into()).or_insert(next)
    }

    fn compile(&mut self, p: &Policy, pi: u32, skip: Option<usize>) -> Candidate {
        Candidate {
            policy: pi,
            reqs: self.compile_reqs(&p.subject.requirements, skip),
        }
    }

    fn compile_reqs(
        &mut self,
        reqs: &[crate::model::Requirement],
        skip: Option<usize>,
    ) -> (u32, u32) {
        let start = self.reqs.len() as u32;
        for (i, r) in reqs.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let key = self.intern_key(&r.key);
            let vstart = self.values.len() as u32;
            let mut vs: Vec<u32> = r.values.iter().map(|v| self.intern_value(v)).collect();
            vs.sort_unstable();
            self.values.extend(vs);
            self.reqs.push(Req {
                key,
                op: r.op,
                values: (vstart, self.values.len() as u32),
            });
        }
        (start, self.reqs.len() as u32)
    }

    /// Policy indices selecting `id`, ascending.
    pub fn lookup(&self, id: &Identity) -> Vec<u32> {
        self.lookup_encoded(&self.encode(id))
    }

    /// As `lookup`, for an identity already encoded.
    pub fn lookup_encoded(&self, labels: &[u32]) -> Vec<u32> {
        let mut out = Vec::with_capacity(16);
        for &k in &self.anchor_keys {
            let v = labels[k as usize];
            if v >= UNKNOWN {
                continue;
            }
            if let Some(&bucket) = self.buckets.get(&(k, v)) {
                let cands = &self.candidates[range(bucket)];
                out.extend(
                    cands
                        .iter()
                        .filter(|c| self.reqs_match(c.reqs, labels))
                        .map(|c| c.policy),
                );
            }
        }
        out.extend(
            self.unanchored
                .iter()
                .filter(|c| self.reqs_match(c.reqs, labels))
                .map(|c| c.policy),
        );
        // Each policy has one anchor and an identity one value per key, so
        // there are no duplicates; sorting restores evaluation order.
        out.sort_unstable();
        out
    }

    fn reqs_match(&self, reqs: (u32, u32), labels: &[u32]) -> bool {
        self.reqs[range(reqs)].iter().all(|r| {
            let v = labels[r.key as usize];
            let listed = || v < UNKNOWN && self.values[range(r.values)].contains(&v);
            match r.op {
                Operator::In => listed(),
                Operator::NotIn => !listed(),
                Operator::Exists => v != ABSENT,
                Operator::DoesNotExist => v == ABSENT,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PolicyName, Requirement, Selector, SourceRef, Tier};

    /// The index must agree with testing every subject selector, for every
    /// operator, unknown values, absent keys and multi-valued anchors.
    #[test]
    fn lookup_equals_scan() {
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let keys = [NAMESPACE_KEY, "app", "team", "tier"];
        let vals = ["a", "b", "c", "d"];
        let ops = [
            Operator::In,
            Operator::NotIn,
            Operator::Exists,
            Operator::DoesNotExist,
        ];
        let mut policies = Vec::new();
        for i in 0..400 {
            let mut reqs = Vec::new();
            for _ in 0..next(4) {
                let key = keys[next(4) as usize];
                let op = ops[next(4) as usize];
                let values: Vec<String> = match op {
                    Operator::In | Operator::NotIn => (0..1 + next(2))
                        .map(|_| vals[next(4) as usize].to_string())
                        .collect(),
                    _ => vec![],
                };
                reqs.push(Requirement::new(key, op, values));
            }
            // The same selector also serves as an ingress peer (after a
            // CIDR peer), and an egress rule with an empty selector.
            let rule = |peers| crate::model::Rule {
                action: crate::model::Action::Allow,
                peers,
                ports: vec![],
                source: SourceRef {
                    file: 0,
                    line: 1,
                    col: 1,
                },
            };
            let cidr = Peer::Cidr(crate::model::CidrBlock {
                cidr: "10.0.0.0/8".parse().unwrap(),
                except: vec![],
            });
            policies.push(Policy {
                tier: Tier::Namespace,
                priority: 0,
                name: PolicyName {
                    kind: "Test".into(),
                    namespace: None,
                    name: format!("p{i}"),
                },
                subject: Selector::new(reqs.clone()),
                ingress: Some(vec![
                    rule(Peers::Any),
                    rule(Peers::AnyOf(vec![
                        cidr,
                        Peer::Identity(Selector::new(reqs)),
                    ])),
                ]),
                egress: Some(vec![rule(Peers::AnyOf(vec![Peer::Identity(
                    Selector::all(),
                )]))]),
                source: SourceRef {
                    file: 0,
                    line: 1,
                    col: 1,
                },
            });
        }
        let ix = SubjectIndex::new(&policies);
        for _ in 0..2000 {
            let mut id = Identity::new();
            for k in keys {
                match next(6) {
                    0 => {}
                    5 => id.insert(k, "zzz-unknown"),
                    n => id.insert(k, vals[(n - 1) as usize]),
                }
            }
            let scan: Vec<u32> = (0..policies.len() as u32)
                .filter(|&p| policies[p as usize].subject.matches(&id))
                .collect();
            assert_eq!(ix.lookup(&id), scan, "identity {id:?}");
            // Interned peer selectors agree with string matching.
            let enc = ix.encode(&id);
            for (pi, p) in policies.iter().enumerate() {
                let want = p.subject.matches(&id);
                assert_eq!(
                    ix.peer_matches(pi as u32, Direction::Ingress, 1, 1, &enc),
                    want
                );
                assert!(ix.peer_matches(pi as u32, Direction::Egress, 0, 0, &enc));
            }
        }
    }
}
