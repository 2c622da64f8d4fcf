//! Syntax rules for Kubernetes names and labels, as the API server enforces
//! them: an offline compiler must reject what a cluster would reject, or CI
//! would bless policies that `kubectl apply` later refuses.

/// RFC 1123 DNS label (namespace names): lowercase alphanumerics and '-',
/// starting and ending alphanumeric, at most 63 characters.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!(
            "{s:?} must be 1 to 63 characters (RFC 1123 DNS label)"
        ));
    }
    let b = s.as_bytes();
    let ok_inner = b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !ok_inner || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err(format!(
            "{s:?} is not a valid RFC 1123 DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// RFC 1123 DNS subdomain (object names): dot-separated DNS labels, at most
/// 253 characters.
pub fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{s:?} must be 1 to 253 characters (DNS subdomain)"));
    }
    for part in s.split('.') {
        if check_dns_label(part).is_err() {
            return Err(format!(
                "{s:?} is not a valid DNS subdomain (lowercase letters, digits, '-' and '.')"
            ));
        }
    }
    Ok(())
}

fn is_name_part(s: &str) -> bool {
    // [A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?, at most 63 characters
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 63 {
        return false;
    }
    let alnum = |c: u8| c.is_ascii_alphanumeric();
    alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter()
            .all(|c| alnum(*c) || matches!(*c, b'-' | b'_' | b'.'))
}

/// A label key: an optional DNS-subdomain prefix and '/', then a name part.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && check_dns_subdomain(p).is_err()
    {
        return Err(format!(
            "label key {key:?}: prefix {p:?} must be a DNS subdomain"
        ));
    }
    if !is_name_part(name) {
        return Err(format!(
            "label key {key:?}: name part must be 1 to 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A label value: empty, or a name part.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} must be at most 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

/// IANA service name (named ports): 1-15 characters of lowercase letters,
/// digits and '-', at least one letter, no leading/trailing or double '-'.
pub fn check_port_name(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "port name {s:?} is not a valid IANA service name (1-15 lowercase letters, digits and '-', at least one letter, no leading, trailing or double '-')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("kubernetes.io/metadata.name").is_ok());
        assert!(check_label_key("a/b/c").is_err());
        assert!(check_label_key("-a").is_err());
        assert!(check_label_key("").is_err());
        assert!(check_label_key("Bad_Prefix/x").is_err());
        assert!(check_label_key("@namespace").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("v1.2_a-b").is_ok());
        assert!(check_label_value("bad value").is_err());
        assert!(check_label_value(&"a".repeat(64)).is_err());
    }

    #[test]
    fn names() {
        assert!(check_dns_label("x").is_ok());
        assert!(check_dns_label("X").is_err());
        assert!(check_dns_label("a-").is_err());
        assert!(check_dns_subdomain("a.b-c").is_ok());
        assert!(check_dns_subdomain("a..b").is_err());
        assert!(check_port_name("serve-80-tcp").is_ok());
        assert!(check_port_name("80").is_err());
        assert!(check_port_name("a--b").is_err());
        assert!(check_port_name("http-web-server-x").is_err());
    }
}
