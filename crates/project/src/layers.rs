//! Reading a project file through its layers (figment does the merging) and remembering which
//! layer gave each value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::error::Kind;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use crate::model::{Extends, Settings, builtin};
use crate::stack::Stack;
use crate::{ProjectError, nearest, var_name};

/// What to load and how to select.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The project file.
    pub file: PathBuf,
    /// `--env` (else `PORTMESH_ENV`, else `dev`).
    pub env: Option<String>,
    /// `--instance` (else `PORTMESH_INSTANCE`, else none).
    pub instance: Option<String>,
    /// `--team` when given on the command line.
    pub team: Option<String>,
    /// The process environment (passed in, so tests need not change their own).
    pub vars: BTreeMap<String, String>,
}

/// Top-level keys an environment variable may set: `PORTMESH_<KEY>`.
const VAR_KEYS: [&str; 5] = ["project", "lease_ttl", "ready_timeout", "stop_timeout", "check_interval"];

/// One layer: a name for people and the values it gives.
#[derive(Debug, Clone)]
struct Layer {
    label: String,
    /// The file it was read from, to point at a line.
    path: Option<PathBuf>,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.label.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// A loaded project: the stack, and the layers it came from.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub stack: Stack,
    layers: Vec<Layer>,
    merged: Dict,
}

/// Loads the project file `opts.file` through every layer, and checks the result.
pub fn load(opts: &Options) -> Result<Resolved, ProjectError> {
    let env = opts
        .env
        .clone()
        .or_else(|| opts.vars.get("PORTMESH_ENV").cloned())
        .unwrap_or_else(|| "dev".to_string());
    let instance = opts.instance.clone().or_else(|| opts.vars.get("PORTMESH_INSTANCE").cloned());
    check_name("environment", &env)?;
    if let Some(i) = &instance {
        check_name("instance", i)?;
    }
    let main = opts.file.display().to_string();

    let mut layers = vec![Layer {
        label: format!("built-in defaults ({env})"),
        path: None,
        dict: to_dict(&builtin(&env))?,
    }];
    file_layers(&opts.file, true, &mut Vec::new(), &mut layers)?;
    let so_far = |layers: &[Layer]| layers.iter().fold(Figment::new(), |f, l| f.merge(l.clone()));

    // The selected sections, as read from every file.
    let files = so_far(&layers);
    for (kind, name) in [("env", Some(&env)), ("instances", instance.as_ref())] {
        let Some(name) = name else { continue };
        if let Ok(Value::Dict(_, dict)) = files.find_value(&format!("{kind}.{name}")) {
            layers.push(Layer { label: format!("{main} [{kind}.{name}]"), path: None, dict });
        }
    }

    // Environment variables.
    let mut dict = Dict::new();
    for key in VAR_KEYS {
        if let Some(v) = opts.vars.get(&format!("PORTMESH_{}", key.to_uppercase())) {
            dict.insert(key.to_string(), Value::from(v.clone()));
        }
    }
    let mut pins = Dict::new();
    if let Ok(Value::Dict(_, services)) = so_far(&layers).find_value("services") {
        for name in services.keys() {
            let var = format!("{}_PORT", var_name(name));
            let Some(text) = opts.vars.get(&var) else { continue };
            let port: u32 = text.trim().parse().map_err(|_| {
                ProjectError::invalid(format!(
                    "environment variable {var}={text:?}: not a port number; it pins service {name:?} \
                     of {main}: set it to a port in 1024-65535 or unset it"
                ))
            })?;
            let mut pin = Dict::new();
            pin.insert("port".into(), Value::from(port));
            pin.insert("strategy".into(), Value::from("fail".to_string()));
            pins.insert(name.clone(), Value::from(pin));
        }
    }
    if !pins.is_empty() {
        dict.insert("services".into(), Value::from(pins));
    }
    layers.push(Layer { label: "environment variables".into(), path: None, dict });

    // Command-line flags.
    let mut dict = Dict::new();
    if let Some(team) = &opts.team {
        dict.insert("team".into(), Value::from(team.clone()));
    }
    layers.push(Layer { label: "command-line flags".into(), path: None, dict });

    let figment = so_far(&layers);
    let settings: Settings = figment.extract().map_err(|e| describe(e, &layers))?;
    let merged = figment.extract::<Dict>().map_err(|e| describe(e, &layers))?;
    for (kind, sections) in [("env", &settings.env), ("instances", &settings.instances)] {
        for (name, s) in sections {
            if s.extends.is_some() || !s.env.is_empty() || !s.instances.is_empty() {
                return Err(ProjectError::invalid(format!(
                    "{main}: [{kind}.{name}] holds extends, [env.…] or [instances.…]; sections do not nest: \
                     move them to the top level"
                )));
            }
        }
    }
    let resolved = Resolved { stack: Stack::default(), layers, merged };
    let origin = |key: &str| {
        let layer = resolved.origin_layer(key);
        let label = layer.map_or(main.as_str(), |l| l.label.as_str());
        // The key itself, else the service or section it belongs to.
        let file = match layer {
            Some(l) => l.path.as_deref(),
            None => Some(opts.file.as_path()),
        };
        at_line(label, file, key)
    };
    let stack = Stack::build(settings, env, instance, &opts.file, &origin)?;
    Ok(Resolved { stack, ..resolved })
}

impl Resolved {
    /// The layer that gave the value at dotted `key`, e.g. `services.api.port`.
    pub fn origin(&self, key: &str) -> Option<&str> {
        self.origin_layer(key).map(|l| l.label.as_str())
    }

    fn origin_layer(&self, key: &str) -> Option<&Layer> {
        let path: Vec<&str> = key.split('.').collect();
        self.layers.iter().rev().find(|l| lookup(&l.dict, &path).is_some())
    }

    /// The layers, lowest first.
    pub fn layers(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|l| l.label.as_str())
    }

    /// The resolved values as TOML, each line with the layer it came from (the `[env.…]` and
    /// `[instances.…]` sections are left out: the selected ones are already applied).
    pub fn show(&self) -> String {
        let mut out = format!(
            "# {} resolved for env {:?}{}; layers, lowest first: {}\n",
            self.stack.file.display(),
            self.stack.env,
            self.stack.instance.as_ref().map(|i| format!(", instance {i:?}")).unwrap_or_default(),
            self.layers().collect::<Vec<_>>().join(" < "),
        );
        let mut rows = Vec::new();
        let top: Dict = self
            .merged
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "env" | "instances"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.table(&mut rows, &mut Vec::new(), &top);
        let width = rows.iter().filter_map(|r| r.1.as_ref().map(|_| r.0.len())).max().unwrap_or(0);
        for (line, origin) in rows {
            match origin {
                Some(o) => out.push_str(&format!("{line:<width$}  # {o}\n")),
                None => out.push_str(&format!("{line}\n")),
            }
        }
        out
    }

    fn table(&self, rows: &mut Vec<(String, Option<String>)>, path: &mut Vec<String>, dict: &Dict) {
        for (k, v) in dict {
            if matches!(v, Value::Dict(..)) {
                continue;
            }
            path.push(k.clone());
            let origin = self.origin(&path.join(".")).map(str::to_string);
            rows.push((format!("{} = {}", toml_key(k), toml_value(v)), origin));
            path.pop();
        }
        for (k, v) in dict {
            if let Value::Dict(_, inner) = v {
                path.push(k.clone());
                if inner.values().any(|v| !matches!(v, Value::Dict(..))) {
                    rows.push((String::new(), None));
                    rows.push((
                        format!("[{}]", path.iter().map(|p| toml_key(p)).collect::<Vec<_>>().join(".")),
                        None,
                    ));
                }
                self.table(rows, path, inner);
                path.pop();
            }
        }
    }
}

fn lookup<'d>(dict: &'d Dict, path: &[&str]) -> Option<&'d Value> {
    let (first, rest) = path.split_first()?;
    let v = dict.get(*first)?;
    match (rest.is_empty(), v) {
        (true, v) => Some(v),
        (false, Value::Dict(_, inner)) => lookup(inner, rest),
        _ => None,
    }
}

fn toml_key(k: &str) -> String {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

fn toml_value(v: &Value) -> String {
    match v.deserialize::<inline::Toml>() {
        Ok(j) => j.0,
        Err(_) => format!("{v:?}"),
    }
}

/// Renders leaf values in the TOML inline syntax (strings, numbers, booleans and arrays of them
/// read the same in TOML as in this rendering).
mod inline {
    use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
    use std::fmt;

    pub struct Toml(pub String);

    impl<'de> Deserialize<'de> for Toml {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(V)
        }
    }

    struct V;

    impl<'de> Visitor<'de> for V {
        type Value = Toml;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a TOML value")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Toml, E> {
            Ok(Toml(v.to_string()))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Toml, E> {
            Ok(Toml(v.to_string()))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Toml, E> {
            Ok(Toml(v.to_string()))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Toml, E> {
            Ok(Toml(v.to_string()))
        }
        fn visit_str<E>(self, v: &str) -> Result<Toml, E> {
            Ok(Toml(format!("{v:?}")))
        }
        fn visit_char<E>(self, v: char) -> Result<Toml, E> {
            Ok(Toml(format!("\"{v}\"")))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Toml, A::Error> {
            let mut items = Vec::new();
            while let Some(Toml(item)) = seq.next_element()? {
                items.push(item);
            }
            Ok(Toml(format!("[{}]", items.join(", "))))
        }
    }
}

/// Adds the layers of `path`: those of the files it extends first, then its own.
fn file_layers(
    path: &Path,
    main: bool,
    visiting: &mut Vec<PathBuf>,
    out: &mut Vec<Layer>,
) -> Result<(), ProjectError> {
    let shown = path.display().to_string();
    let canon = path.canonicalize().map_err(|source| ProjectError::Read { path: shown.clone(), source })?;
    if let Some(at) = visiting.iter().position(|p| *p == canon) {
        let cycle: Vec<String> =
            visiting[at..].iter().chain([&canon]).map(|p| p.display().to_string()).collect();
        return Err(ProjectError::invalid(format!(
            "extends cycle: {}; a file cannot build on itself: remove one of these extends",
            cycle.join(" -> ")
        )));
    }
    let text =
        std::fs::read_to_string(path).map_err(|source| ProjectError::Read { path: shown.clone(), source })?;
    let mut dict = Toml::string(&text)
        .data()
        .map_err(|e| ProjectError::Parse { path: shown.clone(), message: parse_message(e) })?
        .remove(&Profile::Default)
        .unwrap_or_default();
    visiting.push(canon);
    if let Some(v) = dict.remove("extends") {
        let extends: Extends = v.deserialize().map_err(|_| {
            ProjectError::invalid(format!(
                "{shown}: extends: write a file name or a list of them, e.g. extends = \"../base.toml\""
            ))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for f in extends.files() {
            let base = dir.join(f);
            file_layers(&base, false, visiting, out).map_err(|e| match e {
                ProjectError::Read { path, source } => ProjectError::invalid(format!(
                    "{shown}: extends {f:?}: cannot read {path}: {source}; the path is relative to {shown}"
                )),
                other => other,
            })?;
        }
    }
    visiting.pop();
    let label = if main { shown } else { format!("extends {shown}") };
    out.push(Layer { label, path: Some(path.to_path_buf()), dict });
    Ok(())
}

fn parse_message(e: figment::Error) -> String {
    match e.kind {
        Kind::Message(m) => m.trim_end().replace("TOML parse error", "error"),
        other => other.to_string(),
    }
}

fn check_name(what: &str, name: &str) -> Result<(), ProjectError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ProjectError::invalid(format!("{what} name {name:?}: use letters, digits, '-' and '_'")));
    }
    Ok(())
}

fn to_dict(s: &Settings) -> Result<Dict, ProjectError> {
    match Value::serialize(s) {
        Ok(Value::Dict(_, d)) => Ok(d),
        _ => Err(ProjectError::invalid("internal error: built-in defaults do not form a table")),
    }
}

/// Turns figment's errors into messages naming the layer (file), the key and the line.
fn describe(err: figment::Error, layers: &[Layer]) -> ProjectError {
    let mut out = Vec::new();
    for e in err {
        let source = e.metadata.as_ref().map(|m| m.name.to_string()).unwrap_or_else(|| "project file".into());
        let mut path = e.path.clone();
        let what = match &e.kind {
            Kind::UnknownField(field, expected) => {
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                let hint = match nearest(field, expected.iter().copied()) {
                    Some(n) => format!("did you mean {n:?}?"),
                    None => format!("known keys here: {}", expected.join(", ")),
                };
                format!("unknown key {field:?}; {hint}")
            }
            Kind::InvalidType(actual, expected) => {
                format!("{actual} where {} belongs", in_words(expected))
            }
            other => other.to_string(),
        };
        let key = path.join(".");
        let file = layers.iter().find(|l| l.label == source).and_then(|l| l.path.as_deref());
        out.push(format!("{}: {key}: {what}", at_line(&source, file, &key)));
    }
    ProjectError::invalid(out.join("\n"))
}

/// What a type is, in the words of a project file.
fn in_words(expected: &str) -> String {
    let e = expected.trim_start_matches("a ").trim_start_matches("an ");
    match e {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i8" | "i16" | "i32" | "i64" | "isize" => {
            "a whole number (written without quotes)".into()
        }
        "bool" | "boolean" => "true or false (without quotes)".into(),
        "string" | "str" | "char" => "text in quotes".into(),
        "sequence" => "a list, [\"a\", \"b\"]".into(),
        "map" | "dict" => "a table".into(),
        _ => expected.to_string(),
    }
}

/// `FILE, line N: KEY` for a message about dotted `key` of project file `file` (the line when
/// the file shows where it is set).
pub fn where_set(file: &Path, key: &str) -> String {
    format!("{}: {key}", at_line(&file.display().to_string(), Some(file), key))
}

/// `LABEL, line N` when `file` shows where `key` is set, else `LABEL`.
pub(crate) fn at_line(label: &str, file: Option<&Path>, key: &str) -> String {
    match file.and_then(|f| locate(f, key)) {
        Some(n) => format!("{label}, line {n}"),
        None => label.to_string(),
    }
}

/// The line of `file` that sets dotted `key` (`services.web.port`): the key's own line inside
/// its table (`[services.web]` then `port = …`), else the line of the table itself
/// (`[services.web.env]`, or the nearest enclosing one that is there), else the first line that
/// sets the last part of the key anywhere.
fn locate(file: &Path, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    let header = |l: &str| -> Option<String> {
        let l = l.trim();
        let inner = l
            .strip_prefix("[[")
            .and_then(|r| r.strip_suffix("]]"))
            .or_else(|| l.strip_prefix('[')?.strip_suffix(']'))?;
        Some(inner.split('.').map(|p| p.trim().trim_matches('"')).collect::<Vec<_>>().join("."))
    };
    let sets = |l: &str, k: &str| {
        let l = l.trim_start();
        let l = l.strip_prefix('"').map_or(l, |r| r);
        l.strip_prefix(k).is_some_and(|r| r.trim_start_matches('"').trim_start().starts_with('='))
    };
    let parts: Vec<&str> = key.split('.').collect();
    // Every split of the key into TABLE and the key set inside it, longest table first.
    for cut in (0..parts.len()).rev() {
        let (table, rest) = (parts[..cut].join("."), parts[cut..].join("."));
        let mut current = String::new();
        for (i, l) in text.lines().enumerate() {
            if let Some(h) = header(l) {
                if h == key {
                    return Some(i + 1);
                }
                current = h;
            } else if current == table && sets(l, &rest) {
                return Some(i + 1);
            }
        }
    }
    // A table under the key (`[service.a]` for an unknown key `service`).
    let under = format!("{key}.");
    if let Some(i) = text.lines().position(|l| header(l).is_some_and(|h| h.starts_with(&under))) {
        return Some(i + 1);
    }
    for cut in (1..parts.len()).rev() {
        let table = parts[..cut].join(".");
        if let Some(i) = text.lines().position(|l| header(l).as_deref() == Some(table.as_str())) {
            return Some(i + 1);
        }
    }
    let last = parts.last()?;
    text.lines().position(|l| sets(l, last)).map(|i| i + 1)
}
