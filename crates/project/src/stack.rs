//! The resolved, checked stack: what to allocate, in which order to start, with which command
//! and variables.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use portmesh_core::{CheckKind, Strategy};

use crate::model::Settings;
use crate::template::{self, Ref};
use crate::{ProjectError, nearest, var_name};

/// A port of a service: its name and the port it would like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortDef {
    pub name: String,
    pub wanted: Option<u16>,
}

/// The ports a stack got: service → its ports (name, port) in declared order.
pub type Ports = BTreeMap<String, Vec<(String, u16)>>;

/// One service, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceDef {
    pub name: String,
    /// The command template (run with `sh -c` once rendered).
    pub command: String,
    pub pool: Option<String>,
    pub strategy: Strategy,
    /// At least one; the first is `PORT`.
    pub ports: Vec<PortDef>,
    pub check: Option<CheckKind>,
    /// The port the check targets.
    pub check_port: String,
    pub check_interval: Duration,
    pub depends_on: Vec<String>,
    /// Variable templates.
    pub env: BTreeMap<String, String>,
    pub fd: bool,
    pub workdir: PathBuf,
    pub ready_timeout: Duration,
    pub stop_timeout: Duration,
    pub tags: Vec<String>,
}

/// A checked project.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stack {
    pub project: String,
    pub team: String,
    pub env: String,
    pub instance: Option<String>,
    pub file: PathBuf,
    /// The directory commands run in unless a service says otherwise.
    pub dir: PathBuf,
    pub lease_ttl: Duration,
    /// Services in start order: every service after the services it depends on.
    pub services: Vec<ServiceDef>,
}

const DEFAULT_PORT_NAME: &str = "main";

/// The variables a server's main port is passed in: `PORT`, and the ones well-known servers read
/// by themselves, so that `portmesh run -- flask run` listens where it should with no
/// `--port {port}`: `FLASK_RUN_PORT` (`flask run`), `UVICORN_PORT` (uvicorn). gunicorn reads
/// `PORT` itself.
pub fn main_port_vars(port: u16) -> Vec<(String, String)> {
    ["PORT", "FLASK_RUN_PORT", "UVICORN_PORT"]
        .into_iter()
        .map(|k| (k.to_string(), port.to_string()))
        .collect()
}

impl Stack {
    pub(crate) fn build(
        s: Settings,
        env: String,
        instance: Option<String>,
        file: &Path,
        origin: &dyn Fn(&str) -> String,
    ) -> Result<Stack, ProjectError> {
        let main = file.display().to_string();
        let bad = |key: &str, msg: String| ProjectError::invalid(format!("{}: {key}: {msg}", origin(key)));
        let project = s.project.clone().ok_or_else(|| {
            ProjectError::invalid(format!("{main}: no project name: add project = \"NAME\" at the top"))
        })?;
        check_word("project", &project).map_err(|m| bad("project", m))?;
        if s.services.is_empty() {
            return Err(ProjectError::invalid(format!(
                "{main}: no services: add a [services.NAME] table with at least a command"
            )));
        }
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        let dur = |d: Option<crate::Dur>| d.map(|d| d.0).unwrap_or_default();
        let names: BTreeSet<&str> = s.services.keys().map(String::as_str).collect();

        let mut services = BTreeMap::new();
        for (name, sv) in &s.services {
            let key = |k: &str| format!("services.{name}.{k}");
            check_word("service", name).map_err(|m| bad(&format!("services.{name}"), m))?;
            let command = sv.command.clone().filter(|c| !c.trim().is_empty()).ok_or_else(|| {
                ProjectError::invalid(format!(
                    "{}: services.{name}: no command: add command = \"…\" (run with sh -c; {{port}} is its port)",
                    origin(&format!("services.{name}"))
                ))
            })?;
            let wanted = match sv.port {
                None => None,
                Some(p) => Some(port_number(p).map_err(|m| bad(&key("port"), m))?),
            };
            let strategy = match &sv.strategy {
                None => Strategy::Sticky,
                Some(t) => t.parse().map_err(|m| bad(&key("strategy"), m))?,
            };
            let mut ports = Vec::new();
            for entry in sv.ports.clone().unwrap_or_else(|| vec![DEFAULT_PORT_NAME.to_string()]) {
                let (pname, p) = match entry.split_once('=') {
                    None => (entry.as_str(), None),
                    Some((n, p)) => {
                        let p = p
                            .trim()
                            .parse::<u32>()
                            .map_err(|_| bad(&key("ports"), format!("{entry:?}: write NAME or NAME=PORT")))?;
                        (n.trim(), Some(port_number(p).map_err(|m| bad(&key("ports"), m))?))
                    }
                };
                check_word("port", pname).map_err(|m| bad(&key("ports"), m))?;
                if ports.iter().any(|d: &PortDef| d.name == pname) {
                    return Err(bad(&key("ports"), format!("port name {pname:?} appears twice")));
                }
                ports.push(PortDef { name: pname.to_string(), wanted: p });
            }
            if let Some(w) = wanted {
                match ports[0].wanted {
                    Some(p) if p != w => {
                        return Err(bad(
                            &key("port"),
                            format!(
                                "{w} but ports says {}={p}: say the first port's number once",
                                ports[0].name
                            ),
                        ));
                    }
                    _ => ports[0].wanted = Some(w),
                }
            }
            let check = match &sv.check {
                None => None,
                Some(c) => Some(c.parse::<CheckKind>().map_err(|m| bad(&key("check"), m))?),
            };
            let check_port = sv.check_port.clone().unwrap_or_else(|| ports[0].name.clone());
            if !ports.iter().any(|p| p.name == check_port) {
                return Err(bad(
                    &key("check_port"),
                    format!("{check_port:?} is not one of the service's ports"),
                ));
            }
            let depends_on = sv.depends_on.clone().unwrap_or_default();
            for d in &depends_on {
                if !names.contains(d.as_str()) {
                    let hint = nearest(d, names.iter().copied())
                        .map(|n| format!("did you mean {n:?}?"))
                        .unwrap_or_else(|| format!("services: {}", join(names.iter())));
                    return Err(bad(&key("depends_on"), format!("no service {d:?} in this project; {hint}")));
                }
                if d == name {
                    return Err(bad(&key("depends_on"), format!("{name} cannot depend on itself")));
                }
            }
            let workdir = match &sv.workdir {
                None => dir.clone(),
                Some(w) => dir.join(w),
            };
            services.insert(
                name.clone(),
                ServiceDef {
                    name: name.clone(),
                    command,
                    pool: sv.pool.clone(),
                    strategy,
                    ports,
                    check,
                    check_port,
                    check_interval: dur(s.check_interval),
                    depends_on,
                    env: sv.env.clone(),
                    fd: sv.fd.unwrap_or(false),
                    workdir,
                    ready_timeout: sv.ready_timeout.or(s.ready_timeout).map(|d| d.0).unwrap_or_default(),
                    stop_timeout: sv.stop_timeout.or(s.stop_timeout).map(|d| d.0).unwrap_or_default(),
                    tags: sv.tags.clone().unwrap_or_default(),
                },
            );
        }

        // Every template refers to services and ports that exist.
        for svc in services.values() {
            let fields = std::iter::once(("command".to_string(), &svc.command))
                .chain(svc.env.iter().map(|(k, v)| (format!("env.{k}"), v)));
            for (field, text) in fields {
                let key = format!("services.{}.{field}", svc.name);
                let pieces = template::parse(text).map_err(|m| bad(&key, m))?;
                for piece in pieces {
                    if let template::Piece::Ref(Ref::Port { service, name }) = piece {
                        let target = match service {
                            None => svc,
                            Some(t) => services.get(t).ok_or_else(|| {
                                let hint = nearest(t, names.iter().copied())
                                    .map(|n| format!("did you mean {n:?}?"))
                                    .unwrap_or_else(|| format!("services: {}", join(names.iter())));
                                bad(
                                    &key,
                                    format!("{{{t}.port…}} names no service of project {project}; {hint}"),
                                )
                            })?,
                        };
                        if let Some(n) = name
                            && !target.ports.iter().any(|p| p.name == n)
                        {
                            return Err(bad(
                                &key,
                                format!(
                                    "service {} has no port named {n:?} (its ports: {})",
                                    target.name,
                                    join(target.ports.iter().map(|p| &p.name))
                                ),
                            ));
                        }
                    }
                }
            }
        }

        let order = start_order(&services).map_err(|cycle| {
            ProjectError::invalid(format!(
                "{main}: depends_on cycle: {}; a stack starts in order, so remove one of these dependencies",
                cycle.join(" -> ")
            ))
        })?;
        let services = order.iter().filter_map(|n| services.remove(n)).collect();
        Ok(Stack {
            project,
            team: s.team.unwrap_or_else(|| portmesh_core::DEFAULT_TEAM.into()),
            env,
            instance,
            file: file.to_path_buf(),
            dir,
            lease_ttl: dur(s.lease_ttl),
            services,
        })
    }

    /// The instance's name in keys and listings.
    pub fn instance_name(&self) -> &str {
        self.instance.as_deref().unwrap_or("default")
    }

    /// What names this copy of the project: `project/env/instance`.
    pub fn scope(&self) -> String {
        format!("{}/{}/{}", self.project, self.env, self.instance_name())
    }

    /// The sticky key of one port: the same stack gets the same port back after `down`.
    pub fn key(&self, service: &str, port: &str) -> String {
        format!("{}/{service}/{port}", self.scope())
    }

    /// The sticky keys of every port of every service, in the file's order.
    pub fn keys(&self) -> Vec<String> {
        self.services.iter().flat_map(|s| s.ports.iter().map(|p| self.key(&s.name, &p.name))).collect()
    }

    /// The registration id of a service.
    pub fn service_id(&self, service: &str) -> String {
        format!("{}/{service}", self.scope())
    }

    pub fn service(&self, name: &str) -> Option<&ServiceDef> {
        self.services.iter().find(|s| s.name == name)
    }

    fn fill(&self, svc: &ServiceDef, ports: &Ports, text: &str) -> Result<String, String> {
        template::render(text, |r| match r {
            Ref::Port { service, name } => {
                let target = service.unwrap_or(&svc.name);
                let got = ports.get(target).ok_or_else(|| format!("no ports for service {target}"))?;
                let port = match name {
                    None => got.first(),
                    Some(n) => got.iter().find(|(pn, _)| pn == n),
                };
                port.map(|(_, p)| p.to_string())
                    .ok_or_else(|| format!("service {target} has no port {name:?}"))
            }
            Ref::Word("host") => Ok("127.0.0.1".into()),
            Ref::Word("project") => Ok(self.project.clone()),
            Ref::Word("env") => Ok(self.env.clone()),
            Ref::Word("instance") => Ok(self.instance_name().to_string()),
            Ref::Word(_) => Ok(svc.name.clone()),
        })
    }

    /// The command of `svc` with its templates filled in.
    pub fn command(&self, svc: &ServiceDef, ports: &Ports) -> Result<String, String> {
        self.fill(svc, ports, &svc.command)
    }

    /// The port variables of the whole stack: `<SERVICE>_PORT` (first port) and
    /// `<SERVICE>_PORT_<NAME>` for every port of every service.
    pub fn port_vars(&self, ports: &Ports) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (service, list) in ports {
            let v = var_name(service);
            if let Some((_, first)) = list.first() {
                out.push((format!("{v}_PORT"), first.to_string()));
            }
            for (name, p) in list {
                out.push((format!("{v}_PORT_{}", var_name(name)), p.to_string()));
            }
        }
        out
    }

    /// Everything `svc` is started with: the stack's port variables, `PORT` (and the variables of
    /// [`main_port_vars`]) and `PORT_<NAME>` of its own ports, `PORTMESH_PROJECT/ENV/INSTANCE/SERVICE`, then its own `env` (which wins).
    pub fn vars(&self, svc: &ServiceDef, ports: &Ports) -> Result<Vec<(String, String)>, String> {
        let mut out = self.port_vars(ports);
        if let Some(own) = ports.get(&svc.name) {
            if let Some((_, first)) = own.first() {
                out.extend(main_port_vars(*first));
            }
            for (name, p) in own {
                out.push((format!("PORT_{}", var_name(name)), p.to_string()));
            }
        }
        out.push(("PORTMESH_PROJECT".into(), self.project.clone()));
        out.push(("PORTMESH_ENV".into(), self.env.clone()));
        out.push(("PORTMESH_INSTANCE".into(), self.instance_name().to_string()));
        out.push(("PORTMESH_SERVICE".into(), svc.name.clone()));
        out.extend(self.service_env(svc, ports)?);
        Ok(out)
    }

    /// The service's own `env`, templates filled in.
    pub fn service_env(&self, svc: &ServiceDef, ports: &Ports) -> Result<Vec<(String, String)>, String> {
        svc.env.iter().map(|(k, v)| Ok((k.clone(), self.fill(svc, ports, v)?))).collect()
    }
}

fn port_number(p: u32) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(p) if p >= 1024 => Ok(p),
        _ => Err(format!("port {p} is out of range: ports must lie in 1024-65535")),
    }
}

fn check_word(what: &str, w: &str) -> Result<(), String> {
    if w.is_empty() || !w.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("{what} name {w:?}: use letters, digits, '-' and '_'"));
    }
    Ok(())
}

fn join<S: AsRef<str>>(items: impl Iterator<Item = S>) -> String {
    items.map(|s| s.as_ref().to_string()).collect::<Vec<_>>().join(", ")
}

/// Services ordered so that each comes after what it depends on (ties by name), or a cycle.
fn start_order(services: &BTreeMap<String, ServiceDef>) -> Result<Vec<String>, Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        name: &'a str,
        services: &'a BTreeMap<String, ServiceDef>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
        out: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let at = path.iter().position(|p| *p == name).unwrap_or(0);
                return Err(path[at..].iter().chain([&name]).map(|s| s.to_string()).collect());
            }
            None => {}
        }
        marks.insert(name, Mark::Visiting);
        path.push(name);
        if let Some(svc) = services.get(name) {
            for d in &svc.depends_on {
                visit(d, services, marks, path, out)?;
            }
        }
        path.pop();
        marks.insert(name, Mark::Done);
        out.push(name.to_string());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut out = Vec::new();
    for name in services.keys() {
        visit(name, services, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}
