/*
 * The image-team resolver (see examples/image-team) in freestanding C: no
 * libc, no WASI, only the ABI. Built with Debian's clang + lld:
 *
 *   clang --target=wasm32 -O2 -nostdlib -fno-builtin -Wl,--no-entry \
 *         -Wl,--export-dynamic -o image_team_c.wasm image_team.c
 *
 * The host sends compact JSON (no whitespace, keys in a fixed order), but
 * strings may contain escapes; this scanner handles them by refusing a team
 * value with a backslash, which no valid label value contains.
 */

typedef unsigned int u32;
typedef unsigned long long u64;

#define EXPORT(name) __attribute__((export_name(name)))

__attribute__((import_module("trireme"), import_name("log")))
void host_log(int level, const char *ptr, int len);

/* Metadata: the custom section trireme.plugin. C has no attribute for a
 * custom section, but the assembler does. */
__asm__(".section .custom_section.trireme.plugin,\"\",@\n"
        ".ascii \"{\\\"name\\\":\\\"image-team-c\\\",\\\"version\\\":\\\"0.1.0\\\",\\\"abi\\\":1}\"\n"
        ".text\n");

/* Bump allocator over a static arena. The host allocates its input buffer
 * once per instance (and again only to grow it), and outputs live in a
 * static buffer, so nothing needs freeing. */
static unsigned char arena[64 * 1024];
static u32 top;

EXPORT("trireme_abi_version") int abi_version(void) { return 1; }

EXPORT("trireme_alloc") int alloc(int len) {
    u32 n = ((u32)len + 7u) & ~7u;
    if (len <= 0 || n > sizeof(arena) - top) return 0;
    int p = (int)(arena + top);
    top += n;
    return p;
}

EXPORT("trireme_free") void release(int ptr, int len) { (void)ptr; (void)len; }

static int eq(const char *s, u32 n, const char *lit) {
    u32 i = 0;
    for (; lit[i]; i++)
        if (i >= n || s[i] != lit[i]) return 0;
    return i == n;
}

/* Index just past the JSON string starting at s[i] (which is '"'). */
static u32 skip_string(const char *s, u32 n, u32 i) {
    for (i++; i < n; i++) {
        if (s[i] == '\\') i++;
        else if (s[i] == '"') return i + 1;
    }
    return n;
}

/* Finds `"key":` at the top level of the object and returns the index of
 * its value, or n. Top level: depth 1, outside strings. */
static u32 find_key(const char *s, u32 n, const char *key) {
    int depth = 0;
    for (u32 i = 0; i < n;) {
        char c = s[i];
        if (c == '"') {
            u32 end = skip_string(s, n, i);
            if (depth == 1 && end < n && s[end] == ':' && eq(s + i + 1, end - i - 2, key))
                return end + 1;
            i = end;
            continue;
        }
        if (c == '{' || c == '[') depth++;
        if (c == '}' || c == ']') depth--;
        i++;
    }
    return n;
}

static int alnum(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static int valid_value(const char *v, u32 len) {
    if (len == 0 || len > 63 || !alnum(v[0]) || !alnum(v[len - 1])) return 0;
    for (u32 i = 0; i < len; i++)
        if (!alnum(v[i]) && v[i] != '-' && v[i] != '_' && v[i] != '.') return 0;
    return 1;
}

/* `[registry/]team/app[:tag][@digest]` -> team, as (start, len). */
static int team_of_image(const char *img, u32 n, u32 *start, u32 *len) {
    for (u32 i = 0; i < n; i++)
        if (img[i] == '@') { n = i; break; }
    u32 segs = 1, first_end = n;
    for (u32 i = 0; i < n; i++)
        if (img[i] == '/') { if (segs == 1) first_end = i; segs++; }
    u32 s = 0;
    if (segs > 1) {
        int registry = eq(img, first_end, "localhost");
        for (u32 i = 0; i < first_end; i++)
            if (img[i] == '.' || img[i] == ':') registry = 1;
        if (registry) { s = first_end + 1; segs--; }
    }
    if (segs < 2) return 0;
    u32 e = s;
    while (e < n && img[e] != '/') e++;
    *start = s;
    *len = e - s;
    return 1;
}

static char out[128];

EXPORT("trireme_resolve") long long resolve(const char *in, int n_) {
    u32 n = (u32)n_;
    const char *team = 0;
    u32 tlen = 0;
    /* 1. The annotation names the team outright. */
    u32 a = find_key(in, n, "annotations");
    if (a < n && in[a] == '{') {
        u32 end = a;
        int depth = 0;
        for (; end < n; end++) {
            if (in[end] == '"') { end = skip_string(in, n, end) - 1; continue; }
            if (in[end] == '{') depth++;
            if (in[end] == '}' && --depth == 0) break;
        }
        u32 v = find_key(in + a, end - a + 1, "trireme.io/team");
        if (v < end - a + 1 && in[a + v] == '"') {
            u32 vend = skip_string(in + a, end - a + 1, v);
            team = in + a + v + 1;
            tlen = vend - v - 2;
        }
    }
    /* 2. Else the first image. */
    if (!team) {
        u32 i = find_key(in, n, "images");
        if (i + 1 < n && in[i] == '[' && in[i + 1] == '"') {
            u32 end = skip_string(in, n, i + 1);
            u32 s, l;
            if (team_of_image(in + i + 2, end - i - 3, &s, &l)) {
                team = in + i + 2 + s;
                tlen = l;
            }
        }
    }
    if (!team || !valid_value(team, tlen)) return 0;
    const char *pre = "{\"team\":\"";
    u32 o = 0;
    for (u32 i = 0; pre[i]; i++) out[o++] = pre[i];
    for (u32 i = 0; i < tlen; i++) out[o++] = team[i];
    out[o++] = '"';
    out[o++] = '}';
    return ((long long)(u32)out << 32) | o;
}
