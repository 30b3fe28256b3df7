//! `{…}` templates in commands and variables.
//!
//! - `{port}`, `{port.NAME}`: this service's first or named port;
//! - `{SVC.port}`, `{SVC.port.NAME}`: another service's;
//! - `{host}` (127.0.0.1), `{project}`, `{env}`, `{instance}`, `{service}`;
//! - `{{` and `}}` stand for `{` and `}`.

/// One `{…}` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref<'a> {
    /// A port: of `service` (None: the service the template belongs to), named or the first.
    Port { service: Option<&'a str>, name: Option<&'a str> },
    /// `{host}`, `{project}`, `{env}`, `{instance}`, `{service}`.
    Word(&'a str),
}

pub const WORDS: [&str; 5] = ["host", "project", "env", "instance", "service"];

/// The pieces of a template: literal text and references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(String),
    Ref(Ref<'a>),
}

/// Splits `template` into pieces, or says what is wrong with it.
pub fn parse(template: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        text.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            text.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            return Err(format!("a lone '}}' in {template:?}: write '}}}}' for a literal brace"));
        }
        let Some(end) = tail.find('}') else {
            return Err(format!("unclosed '{{' in {template:?}: write '{{{{' for a literal brace"));
        };
        let inner = &tail[1..end];
        if !text.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut text)));
        }
        out.push(Piece::Ref(reference(inner).ok_or_else(|| {
            format!(
                "{{{inner}}} in {template:?} is not a template: write {{port}}, {{port.NAME}}, \
                 {{SERVICE.port}}, {{SERVICE.port.NAME}}, or one of {{host}}, {{project}}, {{env}}, \
                 {{instance}}, {{service}}"
            )
        })?));
        rest = &tail[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

fn reference(inner: &str) -> Option<Ref<'_>> {
    let parts: Vec<&str> = inner.split('.').collect();
    match parts.as_slice() {
        ["port"] => Some(Ref::Port { service: None, name: None }),
        ["port", name] if !name.is_empty() => Some(Ref::Port { service: None, name: Some(name) }),
        [svc, "port"] if !svc.is_empty() => Some(Ref::Port { service: Some(svc), name: None }),
        [svc, "port", name] if !svc.is_empty() && !name.is_empty() => {
            Some(Ref::Port { service: Some(svc), name: Some(name) })
        }
        [word] if WORDS.contains(word) => Some(Ref::Word(word)),
        _ => None,
    }
}

/// Fills `template` in: `lookup` answers each reference, or says why it cannot.
pub fn render(template: &str, lookup: impl Fn(&Ref<'_>) -> Result<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    for piece in parse(template)? {
        match piece {
            Piece::Text(t) => out.push_str(&t),
            Piece::Ref(r) => out.push_str(&lookup(&r)?),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(t: &str) -> Result<String, String> {
        render(t, |r| match r {
            Ref::Port { service: None, name: None } => Ok("5000".into()),
            Ref::Port { service: None, name: Some(n) } => Ok(format!("<{n}>")),
            Ref::Port { service: Some(s), name } => Ok(format!("<{s}:{}>", name.unwrap_or("first"))),
            Ref::Word(w) => Ok(format!("[{w}]")),
        })
    }

    #[test]
    fn references_are_replaced_and_braces_escaped() {
        assert_eq!(fill("flask run --port {port}").unwrap(), "flask run --port 5000");
        assert_eq!(
            fill("postgresql://{host}:{db.port}/{project}").unwrap(),
            "postgresql://[host]:<db:first>/[project]"
        );
        assert_eq!(fill("{port.admin} {api.port.grpc}").unwrap(), "<admin> <api:grpc>");
        assert_eq!(fill("awk '{{print $1}}'").unwrap(), "awk '{print $1}'");
        assert_eq!(fill("plain").unwrap(), "plain");
        assert_eq!(fill("").unwrap(), "");
    }

    #[test]
    fn malformed_templates_say_what_to_write() {
        assert!(fill("{port").unwrap_err().contains("unclosed '{'"));
        assert!(fill("a } b").unwrap_err().contains("lone '}'"));
        let e = fill("{db.host}").unwrap_err();
        assert!(e.contains("{db.host}") && e.contains("{SERVICE.port}"), "{e}");
        assert!(fill("{}").is_err());
        assert!(fill("{.port}").is_err());
    }
}
