//! What user text may be: the limits and character sets of names, keys and free text, and the
//! sanitising of recorded command lines. The request boundary (`portmesh-proto`) refuses names
//! and keys that break these rules before anything is proposed; `apply` checks again.
//!
//! | class | fields | rule |
//! |---|---|---|
//! | name | team, pool, service, instance, env, project, tag, port name | 1–[`MAX_NAME`] bytes of ASCII letters, digits, `-`, `_`, `.` |
//! | key | sticky key, service id, host | 1–[`MAX_KEY`] bytes, no white space or control characters |
//! | text | reservation reason, check output | clipped to [`MAX_TEXT`] bytes, control characters become spaces |
//! | command | the holder's command line | secrets masked ([`Holder::new`]), then clipped like text |
//!
//! A refusal names the field and the rule, never the value (which may be huge, or a secret).

use crate::types::Holder;

/// Longest name (team, pool, service, …), in bytes.
pub const MAX_NAME: usize = 63;
/// Longest key (sticky key, service id, host), in bytes.
pub const MAX_KEY: usize = 255;
/// Longest free text kept (reason, recorded command line), in bytes.
pub const MAX_TEXT: usize = 256;

/// Why a name or key is refused: the field and the rule broken, without the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("{field}: must not be empty")]
    Empty { field: String },
    #[error("{field}: {len} bytes, at most {max}")]
    TooLong { field: String, len: usize, max: usize },
    #[error("{field}: character {ch:?} (at byte {at}) is not allowed: {rule}")]
    BadChar { field: String, ch: char, at: usize, rule: &'static str },
}

const NAME_RULE: &str = "use ASCII letters, digits, '-', '_' and '.'";
const KEY_RULE: &str = "no white space or control characters";

fn check(
    field: &str,
    v: &str,
    max: usize,
    ok: impl Fn(char) -> bool,
    rule: &'static str,
) -> Result<(), TextError> {
    if v.is_empty() {
        return Err(TextError::Empty { field: field.into() });
    }
    if v.len() > max {
        return Err(TextError::TooLong { field: field.into(), len: v.len(), max });
    }
    match v.char_indices().find(|(_, c)| !ok(*c)) {
        Some((at, ch)) => Err(TextError::BadChar { field: field.into(), ch, at, rule }),
        None => Ok(()),
    }
}

/// Checks a name: 1–[`MAX_NAME`] bytes of ASCII letters, digits, `-`, `_`, `.`.
pub fn check_name(field: &str, v: &str) -> Result<(), TextError> {
    check(field, v, MAX_NAME, |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'), NAME_RULE)
}

/// Checks a key: 1–[`MAX_KEY`] bytes without white space or control characters.
pub fn check_key(field: &str, v: &str) -> Result<(), TextError> {
    check(field, v, MAX_KEY, |c| !c.is_whitespace() && !c.is_control(), KEY_RULE)
}

/// Free text as kept: control characters (a forged log line's newline) become spaces, and the
/// text is cut at [`MAX_TEXT`] bytes on a character boundary.
pub fn clean_text(v: &str) -> String {
    clean_text_to(v, MAX_TEXT)
}

/// [`clean_text`] with its own limit of `max` bytes.
pub fn clean_text_to(v: &str, max: usize) -> String {
    let mut out = String::with_capacity(v.len().min(max));
    for c in v.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Words of a flag or variable name that mark its value as a secret.
const SECRET_WORDS: &[&str] =
    &["password", "passwd", "pwd", "secret", "token", "key", "credential", "auth", "apikey"];

fn names_a_secret(name: &str) -> bool {
    let lower = name.trim_start_matches('-').to_ascii_lowercase();
    // `--key` alone is portmesh's own sticky key, not a secret; `--api-key`, `SSH_KEY` are.
    lower != "key" && SECRET_WORDS.iter().any(|w| lower.contains(w))
}

/// A command line with the values of secret-looking arguments masked: `--db-password=x` and
/// `API_KEY=x` keep their name and lose the value, and so does the word after a bare
/// `--password` or `-p`-style flag whose name says secret.
pub fn mask_secrets(command: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut mask_next = false;
    for word in command.split_whitespace() {
        if mask_next {
            out.push("***".into());
            mask_next = false;
            continue;
        }
        match word.split_once('=') {
            Some((name, _)) if names_a_secret(name) => out.push(format!("{name}=***")),
            None if word.starts_with('-') && names_a_secret(word) => {
                out.push(word.to_string());
                mask_next = true;
            }
            _ => out.push(word.to_string()),
        }
    }
    out.join(" ")
}

impl Holder {
    /// The holder as recorded: the pid, and the command line with secrets masked, control
    /// characters removed and cut to [`MAX_TEXT`] bytes. Holders are shown to every reader of
    /// the state (listings, the audit log, the dashboard), so nothing more of a process is kept.
    pub fn new(pid: u32, command: &str) -> Holder {
        Holder { pid, command: clean_text(&mask_secrets(command)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys_are_refused_naming_the_field_and_never_the_value() {
        assert!(check_name("service", "web-1.api_v2").is_ok());
        let long = "x".repeat(120_000);
        let e = check_name("service", &long).unwrap_err().to_string();
        assert_eq!(e, "service: 120000 bytes, at most 63");
        let e = check_name("team", "a\nb").unwrap_err().to_string();
        assert!(e.starts_with("team: character '\\n' (at byte 1) is not allowed"), "{e}");
        assert!(check_name("pool", "").unwrap_err().to_string().contains("must not be empty"));
        assert!(check_name("tag", "a/b").is_err());
        assert!(check_key("key", "shop/dev/default/web/main").is_ok());
        assert!(check_key("host", "fe80::1").is_ok());
        let e = check_key("key", "a b").unwrap_err().to_string();
        assert!(e.contains("' '") && e.contains("no white space"), "{e}");
        assert_eq!(
            check_key("key", &"k".repeat(256)).unwrap_err().to_string(),
            "key: 256 bytes, at most 255"
        );
    }

    #[test]
    fn text_is_cleaned_and_clipped() {
        assert_eq!(clean_text("ok\nforged line\r"), "ok forged line ");
        let t = clean_text(&"é".repeat(500));
        assert!(t.len() <= MAX_TEXT && t.chars().all(|c| c == 'é'));
    }

    #[test]
    fn secrets_in_command_lines_are_masked() {
        let cases = [
            (
                "bash -c portmesh alloc x; : --db-password=hunter2",
                "bash -c portmesh alloc x; : --db-password=***",
            ),
            ("server --api-token TOPSECRET --port 8000", "server --api-token *** --port 8000"),
            ("env AWS_SECRET_ACCESS_KEY=abc python app.py", "env AWS_SECRET_ACCESS_KEY=*** python app.py"),
            ("gunicorn -w 4 shop:app", "gunicorn -w 4 shop:app"),
            ("portmesh up -f portmesh.toml", "portmesh up -f portmesh.toml"),
            ("portmesh alloc web --key shop/web", "portmesh alloc web --key shop/web"),
            ("app --ssh-key ~/.ssh/id", "app --ssh-key ***"),
        ];
        for (line, want) in cases {
            assert_eq!(mask_secrets(line), want, "{line}");
        }
        let h = Holder::new(7, "java -Dpassword=x -jar app.jar\n--forged");
        assert_eq!(h.command, "java -Dpassword=*** -jar app.jar --forged");
        assert!(Holder::new(7, &"a ".repeat(1000)).command.len() <= MAX_TEXT);
    }
}
