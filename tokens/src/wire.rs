//! The bytes that ride in a handshake packet's TCP payload (see
//! docs/wire-format.md). Parsing is total: any input gives a frame or an
//! error, never a panic, and every length is bounded before it is used.

use crate::error::TokenError;

pub const VERSION: u8 = 1;
/// Largest frame we produce or accept: fits in one segment at the IPv6
/// minimum MTU (1280) with IP, TCP headers and options.
pub const MAX_FRAME: usize = 1100;
pub const MAX_JWT: usize = 700;
pub const MAX_KEY_TOKEN: usize = 360;
pub const NONCE: usize = 16;
pub const MAC: usize = 16;

pub const FLAG_KEY_TOKEN: u8 = 0x01;
pub const FLAG_SYN_MAC: u8 = 0x02;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Syn = 1,
    SynAck = 2,
    Ack = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: Kind,
    pub flags: u8,
    pub nonce: [u8; NONCE],
    pub peer_nonce: Option<[u8; NONCE]>,
    pub mac: Option<[u8; MAC]>,
    pub jwt: &'a str,
    pub key_token: Option<&'a str>,
    /// Bytes before the MAC: header and nonces (what the MAC covers, with
    /// the JWT's digest).
    pub prefix: &'a [u8],
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        let end = self.pos.checked_add(n).ok_or(TokenError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(TokenError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn text(&mut self, limit: usize) -> Result<&'a str, TokenError> {
        let [hi, lo] = self.array::<2>()?;
        let n = u16::from_be_bytes([hi, lo]) as usize;
        if n > limit {
            return Err(TokenError::Oversized { size: n, limit });
        }
        if n == 0 {
            return Err(TokenError::Malformed("empty token field"));
        }
        let b = self.take(n)?;
        // A compact JWS is base64url and dots: plain ASCII.
        if !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return Err(TokenError::Malformed("token field is not a compact JWS"));
        }
        std::str::from_utf8(b).map_err(|_| TokenError::Malformed("token field"))
    }
}

pub fn parse(buf: &[u8]) -> Result<Frame<'_>, TokenError> {
    if buf.len() > MAX_FRAME {
        return Err(TokenError::Oversized {
            size: buf.len(),
            limit: MAX_FRAME,
        });
    }
    let mut r = Reader { buf, pos: 0 };
    let [version, kind, flags, reserved] = r.array::<4>()?;
    if version != VERSION {
        return Err(TokenError::Version(version));
    }
    let kind = match kind {
        1 => Kind::Syn,
        2 => Kind::SynAck,
        3 => Kind::Ack,
        k => return Err(TokenError::WrongType(k)),
    };
    let allowed = match kind {
        Kind::Syn => FLAG_KEY_TOKEN | FLAG_SYN_MAC,
        Kind::SynAck => FLAG_KEY_TOKEN,
        Kind::Ack => 0,
    };
    if flags & !allowed != 0 || reserved != 0 {
        return Err(TokenError::Malformed("unknown flags"));
    }
    let nonce = r.array()?;
    let peer_nonce = match kind {
        Kind::Syn => None,
        _ => Some(r.array()?),
    };
    let prefix = &buf[..r.pos];
    let mac = if kind != Kind::Syn || flags & FLAG_SYN_MAC != 0 {
        Some(r.array()?)
    } else {
        None
    };
    let (jwt, key_token) = match kind {
        Kind::Ack => ("", None),
        _ => {
            let jwt = r.text(MAX_JWT)?;
            let kt = if flags & FLAG_KEY_TOKEN != 0 {
                Some(r.text(MAX_KEY_TOKEN)?)
            } else {
                None
            };
            (jwt, kt)
        }
    };
    if r.pos != buf.len() {
        return Err(TokenError::Malformed("trailing bytes"));
    }
    Ok(Frame {
        kind,
        flags,
        nonce,
        peer_nonce,
        mac,
        jwt,
        key_token,
        prefix,
    })
}

/// Start a frame: header and nonces. Returns the buffer; the caller
/// computes the MAC over it and calls `finish`, which appends `tail` bytes
/// (see `tail_len`). The buffer is allocated at its final size: a
/// `MAX_FRAME` allocation is beyond the allocator's per-thread cache and
/// cost 1.7 µs per SYN in a live runtime.
pub fn start(
    kind: Kind,
    flags: u8,
    nonce: &[u8; NONCE],
    peer_nonce: Option<&[u8; NONCE]>,
    tail: usize,
) -> Vec<u8> {
    let nonces = NONCE + peer_nonce.map_or(0, |_| NONCE);
    let mut b = Vec::with_capacity(4 + nonces + tail);
    b.extend_from_slice(&[VERSION, kind as u8, flags, 0]);
    b.extend_from_slice(nonce);
    if let Some(p) = peer_nonce {
        b.extend_from_slice(p);
    }
    b
}

/// The bytes `finish` appends for these parts.
pub fn tail_len(mac: bool, jwt: Option<&str>, key_token: Option<&str>) -> usize {
    let t = |x: Option<&str>| x.map_or(0, |t| 2 + t.len());
    (if mac { MAC } else { 0 }) + t(jwt) + t(key_token)
}

pub fn finish(
    mut b: Vec<u8>,
    mac: Option<&[u8]>,
    jwt: Option<&str>,
    key_token: Option<&str>,
) -> Vec<u8> {
    if let Some(m) = mac {
        b.extend_from_slice(&m[..MAC]);
    }
    for t in [jwt, key_token].into_iter().flatten() {
        b.extend_from_slice(&(t.len() as u16).to_be_bytes());
        b.extend_from_slice(t.as_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_allocated_at_their_final_size() {
        for (mac, jwt, kt) in [
            (true, Some("a.b.c"), None),
            (
                false,
                Some("header.claims.signature"),
                Some("key.token.sig"),
            ),
            (true, None, None),
        ] {
            let b = start(
                Kind::Syn,
                0,
                &[1; NONCE],
                Some(&[2; NONCE]),
                tail_len(mac, jwt, kt),
            );
            let cap = b.capacity();
            let m = [9u8; MAC];
            let b = finish(b, mac.then_some(&m[..]), jwt, kt);
            assert_eq!(b.capacity(), cap, "finish reallocated");
            assert_eq!(b.len(), 4 + 2 * NONCE + tail_len(mac, jwt, kt));
        }
    }
}
