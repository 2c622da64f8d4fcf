// The image-team resolver (see examples/image-team) in AssemblyScript, on
// raw bytes of guest memory, against ABI v1 only. Built with
// `npm run build` (asc --runtime stub --use abort=): the stub runtime has no
// garbage collector, and `abort=` drops the env.abort import, which ABI v1
// would refuse.

@external("trireme", "log")
declare function hostLog(level: i32, ptr: usize, len: i32): void;

export function trireme_abi_version(): i32 {
  return 1;
}

export function trireme_alloc(len: i32): usize {
  return len > 0 ? heap.alloc(<usize>len) : 0;
}

export function trireme_free(ptr: usize, len: i32): void {
  if (ptr != 0) heap.free(ptr);
}

function at(p: usize, i: u32): u8 {
  return load<u8>(p + <usize>i);
}

function eq(p: usize, n: u32, lit: string): bool {
  if (<u32>lit.length != n) return false;
  for (let i: u32 = 0; i < n; i++) {
    if (<u32>at(p, i) != <u32>lit.charCodeAt(i)) return false;
  }
  return true;
}

// Index just past the JSON string starting at p[i] (a '"').
function skipString(p: usize, n: u32, i: u32): u32 {
  for (i++; i < n; i++) {
    const c = at(p, i);
    if (c == 0x5c) i++;
    else if (c == 0x22) return i + 1;
  }
  return n;
}

// Index of the value of top-level `"key":`, or n.
function findKey(p: usize, n: u32, key: string): u32 {
  let depth = 0;
  let i: u32 = 0;
  while (i < n) {
    const c = at(p, i);
    if (c == 0x22) {
      const end = skipString(p, n, i);
      if (depth == 1 && end < n && at(p, end) == 0x3a && eq(p + <usize>i + 1, end - i - 2, key)) {
        return end + 1;
      }
      i = end;
      continue;
    }
    if (c == 0x7b || c == 0x5b) depth++;
    if (c == 0x7d || c == 0x5d) depth--;
    i++;
  }
  return n;
}

function alnum(c: u8): bool {
  return (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39);
}

function validValue(p: usize, n: u32): bool {
  if (n == 0 || n > 63 || !alnum(at(p, 0)) || !alnum(at(p, n - 1))) return false;
  for (let i: u32 = 0; i < n; i++) {
    const c = at(p, i);
    if (!alnum(c) && c != 0x2d && c != 0x5f && c != 0x2e) return false;
  }
  return true;
}

let teamPtr: usize = 0;
let teamLen: u32 = 0;

// `[registry/]team/app[:tag][@digest]` -> team (teamPtr, teamLen).
function teamOfImage(img: usize, n: u32): bool {
  for (let i: u32 = 0; i < n; i++) {
    if (at(img, i) == 0x40) {
      n = i;
      break;
    }
  }
  let segs: u32 = 1;
  let firstEnd = n;
  for (let i: u32 = 0; i < n; i++) {
    if (at(img, i) == 0x2f) {
      if (segs == 1) firstEnd = i;
      segs++;
    }
  }
  let s: u32 = 0;
  if (segs > 1) {
    let registry = eq(img, firstEnd, "localhost");
    for (let i: u32 = 0; i < firstEnd; i++) {
      const c = at(img, i);
      if (c == 0x2e || c == 0x3a) registry = true;
    }
    if (registry) {
      s = firstEnd + 1;
      segs--;
    }
  }
  if (segs < 2) return false;
  let e = s;
  while (e < n && at(img, e) != 0x2f) e++;
  teamPtr = img + <usize>s;
  teamLen = e - s;
  return true;
}

export function trireme_resolve(input: usize, len: i32): i64 {
  const n = <u32>len;
  let found = false;
  // 1. The annotation names the team outright.
  const a = findKey(input, n, "annotations");
  if (a < n && at(input, a) == 0x7b) {
    let end = a;
    let depth = 0;
    for (; end < n; end++) {
      const c = at(input, end);
      if (c == 0x22) {
        end = skipString(input, n, end) - 1;
        continue;
      }
      if (c == 0x7b) depth++;
      if (c == 0x7d) {
        depth--;
        if (depth == 0) break;
      }
    }
    const obj = input + <usize>a;
    const objLen = end - a + 1;
    const v = findKey(obj, objLen, "trireme.io/team");
    if (v < objLen && at(obj, v) == 0x22) {
      const vend = skipString(obj, objLen, v);
      teamPtr = obj + <usize>v + 1;
      teamLen = vend - v - 2;
      found = true;
    }
  }
  // 2. Else the first image.
  if (!found) {
    const i = findKey(input, n, "images");
    if (i + 1 < n && at(input, i) == 0x5b && at(input, i + 1) == 0x22) {
      const end = skipString(input, n, i + 1);
      found = teamOfImage(input + <usize>i + 2, end - i - 3);
    }
  }
  if (!found || !validValue(teamPtr, teamLen)) return 0;
  const prefix = '{"team":"';
  const outLen = <u32>prefix.length + teamLen + 2;
  const out = heap.alloc(<usize>outLen);
  const p = <u32>prefix.length;
  for (let i: u32 = 0; i < p; i++) {
    store<u8>(out + <usize>i, <u8>prefix.charCodeAt(i));
  }
  memory.copy(out + <usize>p, teamPtr, <usize>teamLen);
  store<u8>(out + <usize>(p + teamLen), 0x22);
  store<u8>(out + <usize>(p + teamLen + 1), 0x7d);
  return (<i64>out << 32) | <i64>outLen;
}

// This resolver takes no settings: refuse any, saying why.
export function trireme_init(ptr: usize, len: i32): i32 {
  const msg = String.UTF8.encode("image-team-as takes no settings");
  hostLog(0, changetype<usize>(msg), msg.byteLength);
  return 1;
}
