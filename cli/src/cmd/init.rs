//! `init`: a commented `portmesh.toml` for the project in the current directory, from what the
//! directory shows: a Flask app (an app factory, or a module-level `Flask(__name__)`), and a Redis
//! or PostgreSQL dependency named in `requirements.txt` or `pyproject.toml`. The file is checked
//! by the same loader `up` uses before it is written.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::render::print_or_json;

/// What `init` found in the directory.
#[derive(Debug, Default, PartialEq, Eq)]
struct Found {
    project: String,
    /// `module:create_app` or `module:app`, and whether it is a factory.
    app: Option<(String, bool)>,
    redis: bool,
    postgres: bool,
    gunicorn: bool,
}

pub fn init(force: bool, json: bool) -> Result<()> {
    let dir = std::env::current_dir().context("cannot read the current directory")?;
    let path = dir.join(portmesh_project::DEFAULT_FILE);
    if path.exists() && !force {
        bail!("{} exists already: edit it, or pass --force to replace it", path.display());
    }
    let found = look(&dir);
    let text = render(&found);
    // Checked as `up` would read it (each environment it has), before it replaces anything.
    let draft = dir.join(format!(".{}.init-{}", portmesh_project::DEFAULT_FILE, std::process::id()));
    std::fs::write(&draft, &text).with_context(|| format!("cannot write in {}", dir.display()))?;
    let envs: &[Option<&str>] = if found.gunicorn { &[None, Some("prod")] } else { &[None] };
    for env in envs {
        let opts = portmesh_project::Options {
            file: draft.clone(),
            env: env.map(str::to_string),
            instance: None,
            team: None,
            vars: Default::default(),
        };
        if let Err(e) = portmesh_project::load(&opts) {
            let _ = std::fs::remove_file(&draft);
            return Err(
                anyhow::anyhow!(e).context("the generated file does not load (a bug: please report it)")
            );
        }
    }
    std::fs::rename(&draft, &path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut services = vec!["web"];
    if found.postgres {
        services.insert(0, "db");
    }
    if found.redis {
        services.insert(0, "cache");
    }
    print_or_json(
        json,
        &format!(
            "wrote {} for project {:?}: {}{}; start it with `portmesh up`, see what it resolves to with \
             `portmesh config show`",
            path.display(),
            found.project,
            services.join(", "),
            match &found.app {
                Some((app, _)) => format!(" (the Flask app {app})"),
                None => " (no Flask app found: set the web command)".into(),
            }
        ),
        || {
            json!({"file": path.display().to_string(), "project": found.project, "services": services,
                  "app": found.app.as_ref().map(|(a, _)| a)})
        },
    );
    Ok(())
}

/// A project name from a directory name: lowercase letters, digits and '-'.
fn project_name(dir: &Path) -> String {
    let raw = dir.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let name: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() { "myapp".into() } else { name }
}

/// The Python files at the top of `dir` and in its packages (one level down), as module paths.
fn modules(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let Some(stem) = p.file_stem().map(|s| s.to_string_lossy().into_owned()) else { continue };
        if p.extension().is_some_and(|e| e == "py") {
            out.push((stem, p));
        } else if p.is_dir() && p.join("__init__.py").is_file() {
            out.push((stem.clone(), p.join("__init__.py")));
            if let Ok(inner) = std::fs::read_dir(&p) {
                let mut inner: Vec<_> = inner.flatten().map(|e| e.path()).collect();
                inner.sort();
                for f in inner {
                    if f.extension().is_some_and(|e| e == "py")
                        && f.file_name().is_some_and(|n| n != "__init__.py")
                    {
                        let m = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                        out.push((format!("{stem}.{m}"), f));
                    }
                }
            }
        }
    }
    out
}

fn look(dir: &Path) -> Found {
    let mut found = Found { project: project_name(dir), ..Found::default() };
    let mut plain = None;
    for (module, file) in modules(dir) {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        if text.contains("def create_app(") {
            found.app = Some((format!("{module}:create_app"), true));
            break;
        }
        if plain.is_none()
            && let Some(var) = text.lines().find_map(|l| {
                let (lhs, rhs) = l.split_once('=')?;
                let var = lhs.trim();
                let plain = !var.is_empty() && var.chars().all(|c| c.is_alphanumeric() || c == '_');
                (plain && rhs.trim().starts_with("Flask(")).then(|| var.to_string())
            })
        {
            plain = Some((format!("{module}:{var}"), false));
        }
    }
    if found.app.is_none() {
        found.app = plain;
    }
    let deps: String = ["requirements.txt", "pyproject.toml", "setup.cfg", "Pipfile"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .collect::<Vec<_>>()
        .join("\n")
        .to_lowercase();
    found.redis = deps.contains("redis");
    found.postgres = deps.contains("psycopg") || deps.contains("asyncpg") || deps.contains("postgres");
    found.gunicorn = deps.contains("gunicorn");
    found
}

fn render(f: &Found) -> String {
    let mut t = String::new();
    t.push_str("# portmesh.toml: this project's services, each on a port portmesh holds for it.\n");
    t.push_str("# `portmesh up` starts them in order (each once what it depends on is healthy),\n");
    t.push_str("# `portmesh ps` shows them, `portmesh down` stops them. Reference: docs/project-file.md.\n");
    t.push_str(&format!("project = {:?}\n", f.project));
    if f.postgres {
        t.push_str(
            "\n# PostgreSQL, its data in .pgdata (create it once: initdb -D .pgdata).\n\
             [services.db]\n\
             command = \"postgres -D .pgdata -p {port} -k /tmp -c listen_addresses=127.0.0.1\"\n\
             pool = \"db\"\n\
             check = \"cmd:pg_isready -h 127.0.0.1 -p $PORT\"\n",
        );
    }
    if f.redis {
        t.push_str(
            "\n# Redis, nothing saved to disk.\n\
             [services.cache]\n\
             command = \"redis-server --port {port} --bind 127.0.0.1 --save ''\"\n\
             pool = \"cache\"\n\
             check = \"cmd:redis-cli -p $PORT ping | grep -q PONG\"\n",
        );
    }
    let app = f.app.as_ref().map_or("app:app", |(a, _)| a.as_str());
    t.push_str("\n[services.web]\n");
    if f.app.is_none() {
        t.push_str("# No Flask app was found here: set the command that starts your server on {port}.\n");
    }
    t.push_str(&format!("command = \"flask --app {app} run --port {{port}}\"\n"));
    t.push_str("check = \"tcp\"                 # or \"http:/health\" once the app has a health route\n");
    let deps: Vec<&str> =
        [(f.postgres, "db"), (f.redis, "cache")].iter().filter(|d| d.0).map(|d| d.1).collect();
    if !deps.is_empty() {
        t.push_str(&format!("depends_on = {deps:?}\n\n[services.web.env]\n"));
        if f.postgres {
            t.push_str(&format!("DATABASE_URL = \"postgresql://{{host}}:{{db.port}}/{}\"\n", f.project));
        }
        if f.redis {
            t.push_str("REDIS_URL = \"redis://{host}:{cache.port}/0\"\n");
        }
    }
    if f.gunicorn {
        let target = match &f.app {
            Some((a, true)) => format!("'{a}()'"),
            Some((a, false)) => a.clone(),
            None => "app:app".into(),
        };
        t.push_str(&format!(
            "\n# `portmesh up --env prod`: gunicorn on a socket portmesh binds and hands over.\n\
             [env.prod.services.web]\n\
             command = \"gunicorn --bind fd://3 --workers 4 {}\"\n\
             fd = true\n",
            target.replace('"', "\\\"")
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flask_factory_with_redis_and_postgres_makes_three_services() {
        let dir = tempfile::tempdir().unwrap();
        let shop = dir.path().join("My Shop");
        std::fs::create_dir_all(shop.join("shop")).unwrap();
        std::fs::write(
            shop.join("shop/__init__.py"),
            "from flask import Flask\ndef create_app():\n    pass\n",
        )
        .unwrap();
        std::fs::write(shop.join("requirements.txt"), "Flask\nredis==5\npsycopg[binary]\ngunicorn\n")
            .unwrap();
        let f = look(&shop);
        assert_eq!(
            f,
            Found {
                project: "my-shop".into(),
                app: Some(("shop:create_app".into(), true)),
                redis: true,
                postgres: true,
                gunicorn: true
            }
        );
        let text = render(&f);
        assert!(text.contains("flask --app shop:create_app run --port {port}"), "{text}");
        assert!(text.contains("depends_on = [\"db\", \"cache\"]"), "{text}");
        assert!(text.contains("gunicorn --bind fd://3 --workers 4 'shop:create_app()'"), "{text}");
    }

    #[test]
    fn a_module_level_app_is_found_and_nothing_else_is_guessed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.py"), "from flask import Flask\napp = Flask(__name__)\n")
            .unwrap();
        let f = look(dir.path());
        assert_eq!(f.app, Some(("hello:app".into(), false)));
        assert!(!f.redis && !f.postgres && !f.gunicorn);
        assert!(!render(&f).contains("depends_on"));
    }
}
