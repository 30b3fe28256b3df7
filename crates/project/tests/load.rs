#![allow(clippy::unwrap_used)]

//! Project files read from real files: layering, provenance, and every bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portmesh_core::{CheckKind, Strategy};
use portmesh_project::{Options, ProjectError, Resolved, load};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

fn opts(file: &Path) -> Options {
    Options { file: file.to_path_buf(), ..Options::default() }
}

fn err(o: &Options) -> String {
    match load(o) {
        Ok(r) => panic!("expected an error, got {:?}", r.stack),
        Err(e) => e.to_string(),
    }
}

const SHOP: &str = r#"
project = "shop"

[services.db]
command = "postgres -p {port}"
pool = "db"
check = "tcp"

[services.api]
command = "flask --app api run --port {port}"
depends_on = ["db"]
check = "http:/health"
port = 5000
[services.api.env]
DATABASE_URL = "postgresql://{host}:{db.port}/{project}"

[services.web]
command = "flask --app web run --port {port}"
ports = ["http", "admin=9100"]
depends_on = ["api"]

[env.prod]
ready_timeout = "3m"
[env.prod.services.api]
command = "gunicorn api:app --bind fd://3"
fd = true

[instances.b.services.api]
port = 5100
"#;

#[test]
fn a_stack_resolves_in_dependency_order_with_its_templates_filled() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "portmesh.toml", SHOP);
    let r = load(&opts(&f)).unwrap();
    let s = &r.stack;
    assert_eq!(s.project, "shop");
    assert_eq!(s.team, "default");
    assert_eq!(s.env, "dev");
    let order: Vec<&str> = s.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(order, ["db", "api", "web"]);
    let api = s.service("api").unwrap();
    assert_eq!(api.ports[0].wanted, Some(5000));
    assert_eq!(api.check, Some(CheckKind::Http { path: "/health".into() }));
    assert_eq!(api.strategy, Strategy::Sticky);
    assert_eq!(api.ready_timeout, Duration::from_secs(30));
    let web = s.service("web").unwrap();
    assert_eq!(
        web.ports.iter().map(|p| (p.name.as_str(), p.wanted)).collect::<Vec<_>>(),
        [("http", None), ("admin", Some(9100))]
    );
    assert_eq!(s.key("api", "main"), "shop/dev/default/api/main");

    let ports: portmesh_project::Ports = BTreeMap::from([
        ("db".to_string(), vec![("main".to_string(), 11000)]),
        ("api".to_string(), vec![("main".to_string(), 5000)]),
        ("web".to_string(), vec![("http".to_string(), 8000), ("admin".to_string(), 9100)]),
    ]);
    assert_eq!(s.command(api, &ports).unwrap(), "flask --app api run --port 5000");
    let vars: BTreeMap<String, String> = s.vars(api, &ports).unwrap().into_iter().collect();
    assert_eq!(vars["PORT"], "5000");
    assert_eq!(vars["PORT_MAIN"], "5000");
    assert_eq!(vars["DB_PORT"], "11000");
    assert_eq!(vars["WEB_PORT"], "8000");
    assert_eq!(vars["WEB_PORT_ADMIN"], "9100");
    assert_eq!(vars["DATABASE_URL"], "postgresql://127.0.0.1:11000/shop");
    assert_eq!(vars["PORTMESH_SERVICE"], "api");
    let web_vars: BTreeMap<String, String> = s.vars(web, &ports).unwrap().into_iter().collect();
    assert_eq!((web_vars["PORT"].as_str(), web_vars["PORT_HTTP"].as_str()), ("8000", "8000"));
    assert_eq!(web_vars["API_PORT"], "5000");
}

#[test]
fn every_layer_overrides_the_one_below_and_is_named_as_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "base/common.toml",
        "lease_ttl = \"20s\"\nstop_timeout = \"7s\"\n[services.db]\ncommand = \"redis-server --port {port}\"\npool = \"cache\"\n",
    );
    write(
        dir.path(),
        "base/team.toml",
        "extends = \"common.toml\"\nteam = \"shop-team\"\nstop_timeout = \"8s\"\n",
    );
    let f = write(dir.path(), "app/portmesh.toml", &format!("extends = [\"../base/team.toml\"]\n{SHOP}"));
    // Defaults, extends chain, file.
    let r = load(&opts(&f)).unwrap();
    assert_eq!(r.stack.lease_ttl, Duration::from_secs(20));
    assert_eq!(r.stack.team, "shop-team");
    let db = r.stack.service("db").unwrap();
    assert_eq!(db.command, "postgres -p {port}", "the file overrides what it extends");
    assert_eq!(db.pool.as_deref(), Some("db"));
    assert_eq!(db.stop_timeout, Duration::from_secs(8), "team.toml overrides common.toml");
    assert!(r.origin("lease_ttl").unwrap().ends_with("base/common.toml"), "{:?}", r.origin("lease_ttl"));
    assert!(r.origin("stop_timeout").unwrap().ends_with("base/team.toml"));
    assert!(r.origin("services.db.command").unwrap().ends_with("app/portmesh.toml"));
    assert_eq!(r.origin("ready_timeout"), Some("built-in defaults (dev)"));
    assert_eq!(r.layers().count(), 6);

    // [env.prod] over the file, with prod's own built-in defaults underneath.
    let mut o = opts(&f);
    o.env = Some("prod".into());
    let r = load(&o).unwrap();
    let api = r.stack.service("api").unwrap();
    assert_eq!(api.command, "gunicorn api:app --bind fd://3");
    assert!(api.fd);
    assert_eq!(api.ready_timeout, Duration::from_secs(180));
    assert_eq!(r.stack.service("web").unwrap().ready_timeout, Duration::from_secs(180));
    assert!(r.origin("services.api.command").unwrap().ends_with("[env.prod]"));
    let dev = load(&opts(&f)).unwrap();
    assert!(
        api.ready_timeout > dev.stack.service("api").unwrap().ready_timeout,
        "prod waits longer than dev"
    );
    // A passing service is checked every 10 s in every environment (the node checks every 500 ms
    // while a service starts or fails).
    assert_eq!(api.check_interval, Duration::from_secs(10));
    assert_eq!(dev.stack.service("api").unwrap().check_interval, Duration::from_secs(10));

    // [instances.b] over [env.…]; PORTMESH_ENV selects when --env is absent.
    let mut o = opts(&f);
    o.instance = Some("b".into());
    o.vars.insert("PORTMESH_ENV".into(), "test".into());
    let r = load(&o).unwrap();
    assert_eq!(r.stack.env, "test");
    assert_eq!(r.stack.service("api").unwrap().ports[0].wanted, Some(5100));
    assert_eq!(r.stack.key("api", "main"), "shop/test/b/api/main");
    assert!(r.origin("services.api.port").unwrap().ends_with("[instances.b]"));

    // Environment variables over sections; `<SERVICE>_PORT` pins; flags over everything.
    o.vars.insert("API_PORT".into(), "5200".into());
    o.vars.insert("PORTMESH_LEASE_TTL".into(), "45s".into());
    o.vars.insert("PORTMESH_NODE".into(), "ignored:1".into());
    o.team = Some("flag-team".into());
    let r = load(&o).unwrap();
    let api = r.stack.service("api").unwrap();
    assert_eq!((api.ports[0].wanted, api.strategy), (Some(5200), Strategy::Fail));
    assert_eq!(r.stack.lease_ttl, Duration::from_secs(45));
    assert_eq!(r.stack.team, "flag-team");
    assert_eq!(r.origin("services.api.port"), Some("environment variables"));
    assert_eq!(r.origin("team"), Some("command-line flags"));

    let shown = r.show();
    assert!(shown.contains("env \"test\", instance \"b\""), "{shown}");
    let line = shown.lines().find(|l| l.starts_with("port = 5200")).unwrap_or_else(|| panic!("{shown}"));
    assert!(line.ends_with("# environment variables"), "{line}");
    assert!(shown.contains("[services.api]"), "{shown}");
    assert!(shown.contains("ports = [\"http\", \"admin=9100\"]"), "{shown}");
    assert!(!shown.contains("[env."), "applied sections are not shown again: {shown}");
}

#[test]
fn malformed_toml_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "portmesh.toml", "project = \"shop\"\n[services.api]\ncommand = \"flask run\n");
    let e = load(&opts(&f)).unwrap_err();
    assert!(matches!(e, ProjectError::Parse { .. }));
    let msg = e.to_string();
    assert!(msg.starts_with(&f.display().to_string()), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");
    let f = write(dir.path(), "dup.toml", "project = \"a\"\nproject = \"b\"\n");
    let msg = err(&opts(&f));
    assert!(msg.contains("line 2") && msg.contains("project"), "{msg}");
}

#[test]
fn an_unknown_key_is_named_with_its_line_and_the_nearest_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let f =
        write(dir.path(), "portmesh.toml", "project = \"shop\"\n\n[services.api]\ncomand = \"flask run\"\n");
    let msg = err(&opts(&f));
    assert!(msg.contains("services.api.comand"), "{msg}");
    assert!(msg.contains("line 4"), "{msg}");
    assert!(msg.contains("did you mean \"command\"?"), "{msg}");
    assert!(msg.starts_with(&f.display().to_string()), "{msg}");

    let f = write(
        dir.path(),
        "top.toml",
        "project = \"shop\"\nready_timout = \"3s\"\n[services.a]\ncommand = \"x\"\n",
    );
    let msg = err(&opts(&f));
    assert!(msg.contains("did you mean \"ready_timeout\"?") && msg.contains("line 2"), "{msg}");
    let f = write(
        dir.path(),
        "sect.toml",
        "project = \"shop\"\n[services.a]\ncommand = \"x\"\n[env.dev]\nbogus_thing = 1\n",
    );
    let msg = err(&opts(&f));
    assert!(msg.contains("bogus_thing"), "{msg}");
}

#[test]
fn every_bad_project_gets_a_message_that_says_what_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        ("[services.a]\ncommand = \"x\"\n", "", &["no project name"]),
        ("project = \"p\"\n", "", &["no services"]),
        ("project = \"p\"\n[services.api]\npool = \"web\"\n", "", &["services.api", "no command"]),
        ("project = \"p\"\n[services.api]\ncommand = \"  \"\n", "", &["no command"]),
        (
            "project = \"p\"\n[services.a]\ncommand = \"x\"\ndepends_on = [\"b\"]\n[services.b]\ncommand = \"x\"\ndepends_on = [\"c\"]\n[services.c]\ncommand = \"x\"\ndepends_on = [\"a\"]\n",
            "",
            &["depends_on cycle: a -> b -> c -> a"],
        ),
        (
            "project = \"p\"\n[services.a]\ncommand = \"x\"\ndepends_on = [\"a\"]\n",
            "",
            &["cannot depend on itself"],
        ),
        (
            "project = \"p\"\n[services.api]\ncommand = \"x\"\ndepends_on = [\"dbb\"]\n[services.db]\ncommand = \"x\"\n",
            "",
            &["portmesh.toml, line 4: services.api.depends_on", "no service \"dbb\"", "did you mean \"db\"?"],
        ),
        (
            "project = \"p\"\n[services.api]\ncommand = \"x\"\n[services.api.env]\nDATABASE_URL = \"postgresql://{host}:{postgres.port}/p\"\n[services.db]\ncommand = \"x\"\n",
            "",
            &["line 5: services.api.env.DATABASE_URL", "{postgres.port…} names no service of project p"],
        ),
        (
            "project = \"p\"\n[services.api]\ncommand = \"run {port.admin}\"\n",
            "",
            &["services.api.command", "no port named \"admin\""],
        ),
        ("project = \"p\"\n[services.api]\ncommand = \"run {port\"\n", "", &["unclosed '{'"]),
        (
            "project = \"p\"\n[services.api]\ncommand = \"x\"\nport = 80\n",
            "",
            &["line 4: services.api.port", "1024-65535"],
        ),
        ("project = \"p\"\n[services.api]\ncommand = \"x\"\nport = 70000\n", "", &["1024-65535"]),
        (
            "project = \"p\"\n[services.api]\ncommand = \"x\"\nstrategy = \"best\"\n",
            "",
            &["unknown strategy \"best\""],
        ),
        (
            "project = \"p\"\n[services.api]\ncommand = \"x\"\ncheck = \"udp\"\n",
            "",
            &["line 4: services.api.check", "write tcp"],
        ),
        (
            "project = \"p\"\n[services.api]\ncommand = \"x\"\ncheck = \"tcp\"\ncheck_port = \"grpc\"\n",
            "",
            &["check_port", "not one of"],
        ),
        (
            "project = \"p\"\n[services.api]\ncommand = \"x\"\nports = [\"a\", \"a\"]\n",
            "",
            &["appears twice"],
        ),
        ("project = \"p\"\n[services.api]\ncommand = \"x\"\nports = [\"a=x\"]\n", "", &["NAME=PORT"]),
        // A type mistake in the file's words, at its line; an unknown table at its header.
        (
            "project = \"p\"\n\n[services.api]\ncommand = \"x\"\nport = \"8080\"\n",
            "",
            &[
                "line 5: services.api.port",
                "string \"8080\" where a whole number (written without quotes) belongs",
            ],
        ),
        (
            "project = \"p\"\n\n[service.api]\ncommand = \"x\"\n",
            "",
            &["line 3: service: unknown key \"service\"", "did you mean \"services\"?"],
        ),
        (
            "project = \"p\"\n[services.api]\ncommand = \"x\"\nports = [\"a=6000\"]\nport = 6001\n",
            "",
            &["say the first port's number once"],
        ),
        ("project = \"p/q\"\n[services.api]\ncommand = \"x\"\n", "", &["project name \"p/q\""]),
        ("project = \"p\"\n[services.\"a.b\"]\ncommand = \"x\"\n", "", &["service name \"a.b\""]),
        (
            "project = \"p\"\nready_timeout = \"soon\"\n[services.a]\ncommand = \"x\"\n",
            "",
            &["ready_timeout", "not a duration"],
        ),
        (
            "project = \"p\"\nextends = 3\n[services.a]\ncommand = \"x\"\n",
            "",
            &["extends: write a file name"],
        ),
        (
            "project = \"p\"\nextends = \"missing.toml\"\n[services.a]\ncommand = \"x\"\n",
            "",
            &["extends \"missing.toml\"", "cannot read", "relative to"],
        ),
        (
            "project = \"p\"\n[services.a]\ncommand = \"x\"\n[env.dev]\nextends = \"x.toml\"\n",
            "",
            &["[env.dev]", "do not nest"],
        ),
        (
            "project = \"p\"\n[services.a]\ncommand = \"x\"\n",
            "A_PORT=soon",
            &["A_PORT=\"soon\"", "not a port number"],
        ),
        (
            "project = \"p\"\n[services.a]\ncommand = \"x\"\n",
            "PORTMESH_ENV=dev/x",
            &["environment name \"dev/x\""],
        ),
    ];
    for (i, (text, var, want)) in cases.iter().enumerate() {
        let f = write(dir.path(), &format!("case{i}/portmesh.toml"), text);
        let mut o = opts(&f);
        if let Some((k, v)) = var.split_once('=') {
            o.vars.insert(k.into(), v.into());
        }
        let msg = err(&o);
        for w in *want {
            assert!(msg.contains(w), "case {i}: {msg:?} lacks {w:?}");
        }
    }
}

#[test]
fn an_extends_cycle_is_named_and_a_missing_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "extends = \"b.toml\"\n");
    write(dir.path(), "b.toml", "extends = \"a.toml\"\n");
    let f = write(dir.path(), "portmesh.toml", "extends = \"a.toml\"\nproject = \"p\"\n");
    let msg = err(&opts(&f));
    assert!(msg.contains("extends cycle") && msg.contains("a.toml -> ") && msg.contains("b.toml"), "{msg}");
    let msg = err(&opts(&dir.path().join("nope.toml")));
    assert!(msg.contains("nope.toml: cannot read it"), "{msg}");
}

#[test]
fn resolved_is_usable_by_callers() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "portmesh.toml", SHOP);
    let r: Resolved = load(&opts(&f)).unwrap();
    assert_eq!(r.stack.dir, dir.path());
    assert_eq!(r.stack.service_id("api"), "shop/dev/default/api");
    assert_eq!(r.stack.scope(), "shop/dev/default");
}

/// Every template and example project resolves, in every environment it mentions.
#[test]
fn templates_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    for ex in ["flask-shop", "flask-blog", "flask-cache"] {
        files.push(root.join(ex).join("portmesh.toml"));
    }
    let mut projects = 0;
    for f in files {
        if !std::fs::read_to_string(&f).unwrap().contains("project =") {
            continue; // a base for `extends`, not a project
        }
        for env in ["dev", "test", "prod"] {
            let mut o = opts(&f);
            o.env = Some(env.into());
            let r = load(&o).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(!r.stack.services.is_empty());
        }
        projects += 1;
    }
    assert_eq!(projects, 6);
    let mut o = opts(&root.join("templates/instances.toml"));
    o.instance = Some("demo".into());
    let r = load(&o).unwrap();
    assert_eq!(r.stack.team, "payments", "from team-base.toml");
    assert_eq!(r.stack.service("web").unwrap().ports[0].wanted, Some(8500));
}
