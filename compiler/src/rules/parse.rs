//! The rule language parser (nom 8). Grammar: docs/rule-language.md.
//!
//! Errors carry the byte offset where parsing stopped and what was
//! expected there. A syntax error inside one policy does not hide the
//! others: the parser resumes at the next line that starts a policy, so a
//! run reports every broken policy at once.

use super::ast::*;
use crate::model::{Action, Direction, Protocol};
use nom::branch::alt;
use nom::bytes::complete::{tag, take_while1};
use nom::character::complete::{char, digit1};
use nom::combinator::opt;
use nom::error::{ErrorKind, ParseError};
use nom::{IResult, Parser};

/// Where parsing stopped (bytes *remaining*, so that the furthest error
/// wins) and what would have been accepted there.
#[derive(Debug, Clone, PartialEq)]
pub struct PErr {
    pub rest: usize,
    pub expected: Vec<&'static str>,
    /// A specific message instead of "expected ...".
    pub message: Option<String>,
}

impl<'a> ParseError<&'a str> for PErr {
    fn from_error_kind(i: &'a str, _: ErrorKind) -> Self {
        PErr {
            rest: i.len(),
            expected: vec![],
            message: None,
        }
    }
    fn append(_: &'a str, _: ErrorKind, other: Self) -> Self {
        other
    }
    fn or(self, other: Self) -> Self {
        match self.rest.cmp(&other.rest) {
            std::cmp::Ordering::Less => self,
            std::cmp::Ordering::Greater => other,
            std::cmp::Ordering::Equal => {
                let mut e = self;
                for x in other.expected {
                    if !e.expected.contains(&x) {
                        e.expected.push(x);
                    }
                }
                e.message = e.message.or(other.message);
                e
            }
        }
    }
}

type R<'a, T> = IResult<&'a str, T, PErr>;

fn fail<'a, T>(i: &'a str, expected: &'static str) -> R<'a, T> {
    Err(nom::Err::Error(PErr {
        rest: i.len(),
        expected: vec![expected],
        message: None,
    }))
}

fn failure<T>(i: &str, message: String) -> R<'_, T> {
    Err(nom::Err::Failure(PErr {
        rest: i.len(),
        expected: vec![],
        message: Some(message),
    }))
}

/// Commit: an error after this point is the user's, not a cue to backtrack.
fn cut<'a, T>(r: R<'a, T>) -> R<'a, T> {
    r.map_err(|e| match e {
        nom::Err::Error(e) => nom::Err::Failure(e),
        other => other,
    })
}

/// Spaces, newlines and `#` comments.
pub fn ws(mut i: &str) -> R<'_, ()> {
    loop {
        let t = i.trim_start();
        if let Some(rest) = t.strip_prefix('#') {
            i = rest.find('\n').map_or("", |n| &rest[n..]);
        } else {
            return Ok((t, ()));
        }
    }
}

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '@' | ':')
}

/// A keyword: not followed by another word character.
fn kw<'a>(i: &'a str, k: &'static str) -> R<'a, &'a str> {
    let (i, _) = ws(i)?;
    match tag::<_, _, PErr>(k).parse(i) {
        Ok((rest, t)) if !rest.starts_with(word_char) => Ok((rest, t)),
        _ => fail(i, k),
    }
}

fn sym<'a>(i: &'a str, s: &'static str) -> R<'a, &'a str> {
    let (i, _) = ws(i)?;
    match tag::<_, _, PErr>(s).parse(i) {
        Ok(r) => Ok(r),
        Err(_) => fail(i, s),
    }
}

const KEYWORDS: &[&str] = &[
    "policy", "tier", "priority", "select", "allow", "deny", "pass", "isolate", "ingress",
    "egress", "from", "to", "on", "or", "and", "in", "not", "any", "cidr", "except",
];

/// A double-quoted string (no escapes but `\"` and `\\`).
fn quoted(i: &str) -> R<'_, String> {
    let (mut rest, _) = char('"').parse(i)?;
    let mut out = String::new();
    loop {
        let mut chars = rest.chars();
        match chars.next() {
            None | Some('\n') => return failure(rest, "unterminated string".into()),
            Some('"') => return Ok((chars.as_str(), out)),
            Some('\\') => match chars.next() {
                Some(c @ ('"' | '\\')) => {
                    out.push(c);
                    rest = chars.as_str();
                }
                _ => return failure(rest, "only \\\" and \\\\ escapes are allowed".into()),
            },
            Some(c) => {
                out.push(c);
                rest = chars.as_str();
            }
        }
    }
}

/// A label key, value or name: a bare word or a string. `keywords`: whether
/// a keyword may stand here bare (where nothing else could: after `=`, in a
/// value list, after `!` or `policy`).
fn word_k<'a>(i: &'a str, what: &'static str, keywords: bool) -> R<'a, (String, Pos)> {
    let (i, _) = ws(i)?;
    let start = i.len();
    if i.starts_with('"') {
        let (rest, s) = quoted(i)?;
        return Ok((rest, (s, Pos(start))));
    }
    match take_while1::<_, _, PErr>(word_char).parse(i) {
        Ok((rest, w)) if keywords || !KEYWORDS.contains(&w) => {
            Ok((rest, (w.to_string(), Pos(start))))
        }
        _ => fail(i, what),
    }
}

fn word<'a>(i: &'a str, what: &'static str) -> R<'a, (String, Pos)> {
    word_k(i, what, true)
}

fn number(i: &str) -> R<'_, (i64, Pos)> {
    let (i, _) = ws(i)?;
    let p = Pos(i.len());
    let (rest, d) = match digit1::<_, PErr>(i) {
        Ok(x) => x,
        Err(_) => return fail(i, "a number"),
    };
    match d.parse::<i64>() {
        Ok(n) => Ok((rest, (n, p))),
        Err(_) => failure(i, format!("{d} is too large")),
    }
}

fn values(i: &str) -> R<'_, Vec<String>> {
    let (mut i, _) = cut(sym(i, "("))?;
    let mut out = Vec::new();
    loop {
        let (r, (v, _)) = cut(word(i, "a value"))?;
        out.push(v);
        i = r;
        if let Ok((r, _)) = sym(i, ",") {
            i = r;
            continue;
        }
        let (r, _) = cut(sym(i, ")"))?;
        return Ok((r, out));
    }
}

/// Whether a label operator comes next (then a keyword before it is a key).
fn operator_follows(r: &str) -> bool {
    sym(r, "=").is_ok()
        || sym(r, "!=").is_ok()
        || kw(r, "in").is_ok()
        || kw(r, "not").is_ok_and(|(r2, _)| kw(r2, "in").is_ok())
}

fn requirement(i: &str) -> R<'_, ReqAst> {
    if let Ok((r, _)) = sym(i, "!") {
        let (r, (key, pos)) = cut(word(r, "a label key"))?;
        return Ok((
            r,
            ReqAst {
                pos,
                key,
                kind: ReqKind::NotExists,
            },
        ));
    }
    // A keyword (`tier`, `on`, ...) is a label key only when an operator
    // follows; bare, it ends the selector (quote it to test existence).
    let (i, (key, pos)) = match word_k(i, "a label requirement", false) {
        Ok(x) => x,
        Err(nom::Err::Error(e)) => match word_k(i, "a label requirement", true) {
            Ok((r, w))
                if sym(r, "=").is_ok()
                    || sym(r, "!=").is_ok()
                    || kw(r, "in").is_ok()
                    || (kw(r, "not").is_ok_and(|(r2, _)| kw(r2, "in").is_ok())) =>
            {
                (r, w)
            }
            _ => return Err(nom::Err::Error(e)),
        },
        Err(e) => return Err(e),
    };
    let req = |kind| ReqAst {
        pos,
        key: key.clone(),
        kind,
    };
    if let Ok((r, _)) = sym(i, "!=") {
        let (r, (v, _)) = cut(word(r, "a value"))?;
        return Ok((r, req(ReqKind::Ne(v))));
    }
    if let Ok((r, _)) = sym(i, "=") {
        let (r, (v, _)) = cut(word(r, "a value"))?;
        return Ok((r, req(ReqKind::Eq(v))));
    }
    if let Ok((r, _)) = kw(i, "in") {
        let (r, vs) = values(r)?;
        return Ok((r, req(ReqKind::In(vs))));
    }
    if let Ok((r, _)) = kw(i, "not") {
        let (r, _) = cut(kw(r, "in"))?;
        let (r, vs) = values(r)?;
        return Ok((r, req(ReqKind::NotIn(vs))));
    }
    Ok((i, req(ReqKind::Exists)))
}

/// `any`, or requirements joined by `,` / `and`.
fn selector(i: &str) -> R<'_, Vec<ReqAst>> {
    if let Ok((r, _)) = kw(i, "any")
        && !operator_follows(r)
    {
        return Ok((r, vec![]));
    }
    let (mut i, first) = requirement(i)?;
    let mut out = vec![first];
    loop {
        let Ok((r, _)) = alt((|i| sym(i, ","), |i| kw(i, "and"))).parse(i) else {
            return Ok((i, out));
        };
        let (r, q) = cut(requirement(r))?;
        out.push(q);
        i = r;
    }
}

fn cidr_token(i: &str) -> R<'_, (String, Pos)> {
    let (i, _) = ws(i)?;
    let p = Pos(i.len());
    match take_while1::<_, _, PErr>(|c: char| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/'))
        .parse(i)
    {
        Ok((r, t)) => Ok((r, (t.to_string(), p))),
        Err(_) => fail(i, "a CIDR such as 10.0.0.0/8"),
    }
}

fn peer(i: &str) -> R<'_, PeerAst> {
    if let Ok((r, _)) = kw(i, "cidr")
        && !operator_follows(r)
    {
        let (mut r, (cidr, pos)) = cut(cidr_token(r))?;
        let mut except = Vec::new();
        if let Ok((r2, _)) = kw(r, "except") {
            let (mut r2, first) = cut(cidr_token(r2))?;
            except.push(first);
            while let Ok((r3, _)) = sym(r2, ",") {
                let (r4, e) = cut(cidr_token(r3))?;
                except.push(e);
                r2 = r4;
            }
            r = r2;
        }
        return Ok((r, PeerAst::Cidr { pos, cidr, except }));
    }
    let (r, sel) = selector(i)?;
    Ok((r, PeerAst::Labels(sel)))
}

fn port(i: &str) -> R<'_, PortAst> {
    let (i, _) = ws(i)?;
    let pos = Pos(i.len());
    let mut protocol = Protocol::Tcp;
    let mut i = i;
    for (name, p) in [
        ("tcp/", Protocol::Tcp),
        ("udp/", Protocol::Udp),
        ("sctp/", Protocol::Sctp),
    ] {
        if let Some(r) = i
            .get(..name.len())
            .filter(|h| h.eq_ignore_ascii_case(name))
            .map(|_| &i[name.len()..])
        {
            protocol = p;
            i = r;
            break;
        }
    }
    if let Ok((r, _)) = kw(i, "any") {
        return Ok((
            r,
            PortAst {
                pos,
                protocol,
                spec: PortSpec::Any,
            },
        ));
    }
    if let Ok((r, d)) = digit1::<_, PErr>(i) {
        let first: u32 = d.parse().unwrap_or(u32::MAX);
        let (r, last) = match opt(|i| -> R<'_, &str> {
            let (i, _) = char('-').parse(i)?;
            digit1(i)
        })
        .parse(r)?
        {
            (r, Some(e)) => (r, e.parse().unwrap_or(u32::MAX)),
            (r, None) => (r, first),
        };
        return Ok((
            r,
            PortAst {
                pos,
                protocol,
                spec: PortSpec::Range(first, last),
            },
        ));
    }
    match take_while1::<_, _, PErr>(|c: char| c.is_ascii_alphanumeric() || c == '-').parse(i) {
        Ok((r, n)) if !KEYWORDS.contains(&n) => Ok((
            r,
            PortAst {
                pos,
                protocol,
                spec: PortSpec::Named(n.to_string()),
            },
        )),
        _ => fail(i, "a port (80, 8000-8100, udp/53, tcp/any or a port name)"),
    }
}

/// `ask NAME`: a decide plugin given to the compiler as `--plugin NAME=FILE`.
fn ask(i: &str) -> R<'_, Verb> {
    let (i, _) = kw(i, "ask")?;
    let (i, _) = ws(i)?;
    match take_while1::<_, _, PErr>(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        .parse(i)
    {
        Ok((r, n)) if !KEYWORDS.contains(&n) => Ok((r, Verb::Ask(n.to_string()))),
        _ => failure(
            i,
            "a plugin name after `ask` (as given to --plugin NAME=FILE)".to_string(),
        ),
    }
}

fn rule(i: &str) -> R<'_, RuleAst> {
    let (i, _) = ws(i)?;
    let pos = Pos(i.len());
    let (i, verb) = alt((
        |i| kw(i, "allow").map(|(r, _)| (r, Verb::Act(Action::Allow))),
        |i| kw(i, "deny").map(|(r, _)| (r, Verb::Act(Action::Deny))),
        |i| kw(i, "pass").map(|(r, _)| (r, Verb::Act(Action::Pass))),
        |i| kw(i, "isolate").map(|(r, _)| (r, Verb::Isolate)),
        ask,
    ))
    .parse(i)?;
    let (i, direction) = cut(alt((
        |i| kw(i, "ingress").map(|(r, _)| (r, Direction::Ingress)),
        |i| kw(i, "egress").map(|(r, _)| (r, Direction::Egress)),
    ))
    .parse(i))?;
    let isolate = verb == Verb::Isolate;
    let mut rule = RuleAst {
        pos,
        verb,
        direction,
        peers: None,
        ports: vec![],
    };
    if isolate {
        return Ok((i, rule));
    }
    let mut i = i;
    let (want, other) = match direction {
        Direction::Ingress => ("from", "to"),
        Direction::Egress => ("to", "from"),
    };
    if kw(i, other).is_ok() {
        let (at, _) = ws(i)?;
        return failure(
            at,
            format!("{direction} rules name their peers with `{want}`, not `{other}`"),
        );
    }
    if let Ok((r, _)) = kw(i, want) {
        let (mut r, first) = cut(peer(r))?;
        let mut peers = vec![first];
        while let Ok((r2, _)) = kw(r, "or") {
            let (r3, p) = cut(peer(r2))?;
            peers.push(p);
            r = r3;
        }
        rule.peers = Some(peers);
        i = r;
    }
    if let Ok((r, _)) = kw(i, "on") {
        let (mut r, first) = cut(port(r))?;
        rule.ports.push(first);
        while let Ok((r2, _)) = sym(r, ",") {
            let (r3, p) = cut(port(r2))?;
            rule.ports.push(p);
            r = r3;
        }
        i = r;
    }
    Ok((i, rule))
}

fn policy(i: &str) -> R<'_, PolicyAst> {
    let (i, _) = ws(i)?;
    let pos = Pos(i.len());
    let (i, _) = kw(i, "policy")?;
    let (mut i, (name, name_pos)) = cut(word(i, "a policy name"))?;
    let mut p = PolicyAst {
        pos,
        name,
        name_pos,
        tier: None,
        priority: None,
        select: vec![],
        rules: vec![],
    };
    loop {
        if let Ok((r, _)) = kw(i, "tier") {
            let (r, t) = cut(alt((
                |i| kw(i, "admin").map(|(r, _)| (r, TierAst::Admin)),
                |i| kw(i, "namespace").map(|(r, _)| (r, TierAst::Namespace)),
                |i| kw(i, "baseline").map(|(r, _)| (r, TierAst::Baseline)),
            ))
            .parse(r))?;
            p.tier = Some(t);
            i = r;
        } else if let Ok((r, _)) = kw(i, "priority") {
            let (r, n) = cut(number(r))?;
            p.priority = Some(n);
            i = r;
        } else {
            break;
        }
    }
    let (i, _) = cut(alt((|i| sym(i, "{"), |i| kw(i, "tier"), |i| kw(i, "priority"))).parse(i))?;
    let (i, _) = cut(kw(i, "select"))?;
    let (mut i, sel) = cut(selector(i))?;
    p.select = sel;
    loop {
        match rule(i) {
            Ok((r, ru)) => {
                p.rules.push(ru);
                i = r;
            }
            Err(nom::Err::Error(e)) => {
                return match sym(i, "}") {
                    Ok((r, _)) => Ok((r, p)),
                    Err(nom::Err::Error(e2)) => Err(nom::Err::Failure(e.or(e2))),
                    Err(other) => Err(other),
                };
            }
            Err(e) => return Err(e),
        }
    }
}

/// The parser records positions as bytes *remaining*; turn them into
/// offsets from the start of the text.
fn to_offsets(p: &mut PolicyAst, total: usize) {
    let f = |x: &mut Pos| x.0 = total - x.0;
    let reqs = |rs: &mut Vec<ReqAst>| rs.iter_mut().for_each(|r| f(&mut r.pos));
    f(&mut p.pos);
    f(&mut p.name_pos);
    if let Some((_, pp)) = &mut p.priority {
        f(pp);
    }
    reqs(&mut p.select);
    for r in &mut p.rules {
        f(&mut r.pos);
        for peer in r.peers.iter_mut().flatten() {
            match peer {
                PeerAst::Labels(rs) => reqs(rs),
                PeerAst::Cidr { pos, except, .. } => {
                    f(pos);
                    except.iter_mut().for_each(|(_, ep)| f(ep));
                }
            }
        }
        r.ports.iter_mut().for_each(|pt| f(&mut pt.pos));
    }
}

/// A syntax error: byte offset and message.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub offset: usize,
    pub message: String,
}

fn describe(e: &PErr) -> String {
    if let Some(m) = &e.message {
        return m.clone();
    }
    let mut ex: Vec<String> = e.expected.iter().map(|x| format!("`{x}`")).collect();
    ex.dedup();
    match ex.len() {
        0 => "syntax error".into(),
        1 => format!("expected {}", ex[0]),
        _ => {
            let last = ex.pop().unwrap_or_default();
            format!("expected {} or {last}", ex.join(", "))
        }
    }
}

/// Parse a whole file; every broken policy is reported.
pub fn parse(text: &str) -> Result<File, Vec<SyntaxError>> {
    let mut file = File::default();
    let mut errors = Vec::new();
    let mut i = text;
    while let Ok((r, _)) = ws(i) {
        i = r;
        if i.is_empty() {
            break;
        }
        match policy(i) {
            Ok((r, mut p)) => {
                to_offsets(&mut p, text.len());
                file.policies.push(p);
                i = r;
            }
            Err(nom::Err::Error(e) | nom::Err::Failure(e)) => {
                let offset = text.len() - e.rest;
                let e = if e.rest == i.len() && e.expected == vec!["policy"] {
                    PErr {
                        message: Some("expected `policy` (a file is a list of policies)".into()),
                        ..e
                    }
                } else {
                    e
                };
                errors.push(SyntaxError {
                    offset,
                    message: describe(&e),
                });
                // Resume at the next line that starts a policy.
                let from = offset.min(text.len());
                let next = text[from..]
                    .match_indices('\n')
                    .map(|(k, _)| from + k + 1)
                    .find(|&k| {
                        let line = text[k..].trim_start_matches([' ', '\t']);
                        line.starts_with("policy") && !line["policy".len()..].starts_with(word_char)
                    });
                match next {
                    Some(k) => i = &text[k..],
                    None => break,
                }
            }
            Err(nom::Err::Incomplete(_)) => break,
        }
    }
    if errors.is_empty() {
        Ok(file)
    } else {
        Err(errors)
    }
}

/// The `#` comments of a file with their offsets (strings are skipped), so
/// that `fmt` can keep them.
pub fn comments(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut in_str = false;
    let mut escaped = false;
    let b = text.as_bytes();
    let mut k = 0;
    while k < b.len() {
        let c = b[k];
        if in_str {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' || c == b'\n' {
                in_str = false;
            }
        } else if c == b'"' {
            in_str = true;
        } else if c == b'#' {
            let end = text[k..].find('\n').map_or(text.len(), |e| k + e);
            out.push((k, text[k..end].trim_end()));
            k = end;
            continue;
        }
        k += 1;
    }
    out
}
