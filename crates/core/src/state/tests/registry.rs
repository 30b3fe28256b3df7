//! The service registry, and registrations made with an allocation.

use super::*;

#[test]
fn register_replace_deregister() {
    let mut h = Harness::new();
    let Response::Registered { service: s, replaced: false, revision } =
        h.apply(Command::Register(Box::new(service("api-1", "api", 8001))))
    else {
        panic!()
    };
    assert_eq!((s.status, s.output.as_str(), s.revision), (HealthStatus::Passing, "", revision));
    let mut checked = service("api-1", "api", 8001);
    checked.check = Some(tcp_check());
    let Response::Registered { service: s, replaced: true, .. } =
        h.apply(Command::Register(Box::new(checked.clone())))
    else {
        panic!()
    };
    assert_eq!(s.status, HealthStatus::Unknown, "a new check starts unknown");
    h.apply(Command::SetHealth { updates: vec![health("api-1", HealthStatus::Critical)] });
    // The same registration again (a restarted wrapper) keeps what the checks found.
    let Response::Registered { service: s, .. } = h.apply(Command::Register(Box::new(checked))) else {
        panic!()
    };
    assert_eq!((s.status, s.output.as_str()), (HealthStatus::Critical, "now critical"));
    assert_eq!(h.st.services().count(), 1);
    let Response::Deregistered { service: gone, revision } =
        h.apply(Command::Deregister { team: "default".into(), id: "api-1".into() })
    else {
        panic!()
    };
    assert_eq!(gone.id, "api-1");
    let kinds: Vec<_> = h.st.events_since(revision).map(|e| &e.kind).collect();
    assert!(
        matches!(kinds[..], [EventKind::ServiceDeregistered { cause: ReleaseCause::Released, .. }]),
        "{kinds:?}"
    );
    let r = h.reject(Command::Deregister { team: "default".into(), id: "api-1".into() });
    assert!(r.to_string().contains("no service \"api-1\" is registered"), "{r}");
    assert_eq!(r.kind(), "not_found");
}

#[test]
fn health_updates_record_only_transitions() {
    let mut h = Harness::new();
    let mut svc = service("db-1", "db", 11000);
    svc.check = Some(tcp_check());
    h.apply(Command::Register(Box::new(svc)));
    let rev = h.st.revision();
    let r = h.apply(Command::SetHealth {
        updates: vec![health("db-1", HealthStatus::Passing), health("gone", HealthStatus::Critical)],
    });
    assert_eq!(r, Response::HealthSet { changed: 1, revision: rev + 1 });
    // No change: no revision, no event.
    let r = h.apply(Command::SetHealth { updates: vec![health("db-1", HealthStatus::Passing)] });
    assert_eq!(r, Response::HealthSet { changed: 0, revision: rev + 1 });
    h.apply(Command::SetHealth {
        updates: vec![health("db-1", HealthStatus::Critical), health("db-1", HealthStatus::Critical)],
    });
    let changes: Vec<_> =
        h.st.events_since(rev)
            .filter_map(|e| match &e.kind {
                EventKind::HealthChanged(h) => Some((h.previous, h.status)),
                _ => None,
            })
            .collect();
    assert_eq!(
        changes,
        [(HealthStatus::Unknown, HealthStatus::Passing), (HealthStatus::Passing, HealthStatus::Critical)]
    );
    let long = HealthUpdate { output: "é".repeat(600), ..health("db-1", HealthStatus::Warning) };
    h.apply(Command::SetHealth { updates: vec![long] });
    let out = &h.st.service("default", "db-1").unwrap().output;
    assert!(out.len() <= crate::MAX_CHECK_OUTPUT && out.starts_with('é'), "cut at a char boundary");
}

#[test]
fn lease_end_removes_registrations_exactly_once() {
    let mut h = Harness::new();
    let Response::Allocated { grants, lease: Some(lease), .. } =
        h.alloc_with(vec![in_pool("api", "web")], LeaseSpec::New { ttl_ms: 10_000 }, None)
    else {
        panic!()
    };
    let mut svc = service("api-1", "api", grants[0].allocation.port);
    svc.lease_id = Some(lease.id);
    h.apply(Command::Register(Box::new(svc)));
    h.apply(Command::Register(Box::new(service("other", "api", 8999))));
    assert_eq!(h.st.lease_services(lease.id).count(), 1);
    let Response::Expired { revision, .. } = h.apply(Command::ExpireLeases { ids: vec![lease.id] }) else {
        panic!()
    };
    let gone: Vec<_> =
        h.st.events_since(revision)
            .filter_map(|e| match &e.kind {
                EventKind::ServiceDeregistered { service, cause } => Some((service.id.clone(), *cause)),
                _ => None,
            })
            .collect();
    assert_eq!(gone, [("api-1".to_string(), ReleaseCause::LeaseExpired)]);
    assert!(h.st.service("default", "api-1").is_none() && h.st.service("default", "other").is_some());
    assert_eq!(h.st.lease_services(lease.id).count(), 0);
    // Expiring again changes nothing.
    let rev = h.st.revision();
    h.apply(Command::ExpireLeases { ids: vec![lease.id] });
    assert_eq!(h.st.revision(), rev);
    // Registering on a dead lease or another team's lease is refused.
    let mut late = service("late", "api", 8001);
    late.lease_id = Some(lease.id);
    assert!(h.reject(Command::Register(Box::new(late))).to_string().contains("unknown lease"));
}

#[test]
fn bad_registrations_are_refused_and_change_nothing() {
    let mut h = Harness::new();
    let with = |f: &dyn Fn(&mut Service)| {
        let mut s = service("x", "api", 8001);
        f(&mut s);
        s
    };
    let check = |f: &dyn Fn(&mut HealthCheck)| {
        with(&|s| {
            let mut c = tcp_check();
            f(&mut c);
            s.check = Some(c);
        })
    };
    let table: Vec<(Service, &str)> = vec![
        (with(&|s| s.name = "bad name".into()), "service name \"bad name\" is not valid"),
        (with(&|s| s.id = String::new()), "service id \"\" is not valid"),
        (with(&|s| s.ports.clear()), "needs at least one port"),
        (with(&|s| s.ports[0].port = 80), "port 80 is out of range"),
        (with(&|s| s.host = String::new()), "needs the host"),
        (
            with(&|s| s.ports.push(ServicePort { name: "http".into(), port: 8002, protocol: String::new() })),
            "names port \"http\" twice",
        ),
        (with(&|s| s.project = Some("a/b".into())), "project name \"a/b\" is not valid"),
        (check(&|c| c.interval_ms = 10), "check interval 10 ms is too short"),
        (check(&|c| c.timeout_ms = 0), "check timeout 0 ms is not valid"),
        (check(&|c| c.failures = 0), "failures must be at least 1"),
        (
            check(&|c| c.port = Some("admin".into())),
            "the check names port \"admin\", but service \"api\" has ports: http",
        ),
        (check(&|c| c.kind = CheckKind::Http { path: "health".into() }), "must start with '/'"),
        (check(&|c| c.kind = CheckKind::Command { command: " ".into() }), "needs a command"),
        (with(&|s| s.lease_id = Some(77)), "unknown lease 77"),
    ];
    for (svc, msg) in table {
        let r = h.reject(Command::Register(Box::new(svc)));
        assert!(r.to_string().contains(msg), "want {msg:?}, got {r}");
    }
    assert_eq!(h.st.services().count(), 0);
}

#[test]
fn an_allocation_registers_its_service_in_the_same_step() {
    let mut h = Harness::new();
    let both = AllocateBatch {
        lease: LeaseSpec::New { ttl_ms: 10_000 },
        register: Some(riding("api", &["http", "admin"])),
        ..batch(vec![in_pool("api", "web"), in_pool("api-admin", "web")])
    };
    let Response::Allocated { grants, lease: Some(lease), revision, registered: Some(svc) } =
        h.apply(Command::Allocate(both))
    else {
        panic!()
    };
    let ports: Vec<u16> = grants.iter().map(|g| g.allocation.port).collect();
    // The ports in item order, the batch's team, host and lease, the default id, one revision.
    assert_eq!(svc.ports.iter().map(|p| p.port).collect::<Vec<_>>(), ports);
    assert_eq!((svc.team.as_str(), svc.host.as_str(), svc.lease_id), ("default", "h1", Some(lease.id)));
    assert_eq!(svc.id, format!("api@h1:{}", ports[0]));
    assert_eq!((svc.revision, svc.status), (revision, HealthStatus::Passing));
    assert_eq!(h.st.service("default", &svc.id), Some(svc.as_ref()));
    let kinds: Vec<&str> =
        h.st.events_since(revision - 1)
            .map(|e| match &e.kind {
                EventKind::LeaseGranted { .. } => "lease",
                EventKind::Allocated(_) => "allocated",
                EventKind::ServiceRegistered(_) => "registered",
                other => panic!("{other:?}"),
            })
            .collect();
    assert_eq!(kinds, ["lease", "allocated", "allocated", "registered"]);
    // Ending the lease ends both.
    h.apply(Command::RevokeLease { team: "default".into(), id: lease.id });
    assert_eq!((h.st.services().count(), h.st.allocations().count()), (0, 0));

    // On an existing lease, with an id of its own.
    let Response::LeaseGranted(lease) =
        h.apply(Command::GrantLease { team: "default".into(), ttl_ms: 10_000 })
    else {
        panic!()
    };
    let mut reg = riding("db", &["main"]);
    reg.id = "db-1".into();
    let db = AllocateBatch {
        lease: LeaseSpec::Existing(lease.id),
        register: Some(reg),
        ..batch(vec![in_pool("db", "web")])
    };
    let Response::Allocated { registered: Some(svc), .. } = h.apply(Command::Allocate(db)) else { panic!() };
    assert_eq!((svc.id.as_str(), svc.lease_id), ("db-1", Some(lease.id)));
}

#[test]
fn a_bad_registration_refuses_the_allocation_and_changes_nothing() {
    let mut h = Harness::new();
    let with = |f: &dyn Fn(&mut Service)| {
        let mut s = riding("api", &["http"]);
        f(&mut s);
        s
    };
    let table: Vec<(Box<Service>, &str)> = vec![
        (riding("api", &["http", "admin"]), "register.ports: 2 named for 1 items"),
        (riding("api", &[]), "register.ports: 0 named for 1 items"),
        (with(&|s| s.name = "bad name".into()), "service name \"bad name\" is not valid"),
        (with(&|s| s.check = Some(HealthCheck { interval_ms: 10, ..tcp_check() })), "check interval 10 ms"),
    ];
    for (reg, msg) in table {
        let r = h.reject(Command::Allocate(AllocateBatch {
            lease: LeaseSpec::New { ttl_ms: 10_000 },
            register: Some(reg),
            ..batch(vec![in_pool("api", "web")])
        }));
        assert!(r.to_string().contains(msg), "want {msg:?}, got {r}");
    }
    assert_eq!((h.st.revision(), h.st.allocations().count(), h.st.services().count()), (0, 0, 0));
}

/// A sticky key live under another lease returns that holder's port: the registration would
/// describe (and, by its id, replace) the holder's service, so it is not made.
#[test]
fn a_registration_is_not_made_on_another_lease_s_port() {
    let mut h = Harness::new();
    let keyed = || AllocItem { key: Some("shop/api".into()), ..in_pool("api", "web") };
    let first = AllocateBatch {
        lease: LeaseSpec::New { ttl_ms: 10_000 },
        register: Some(riding("api", &["http"])),
        ..batch(vec![keyed()])
    };
    let Response::Allocated { registered: Some(theirs), .. } = h.apply(Command::Allocate(first.clone()))
    else {
        panic!()
    };
    let Response::Allocated { grants, lease: Some(second), registered: None, .. } =
        h.apply(Command::Allocate(first))
    else {
        panic!("the second run's registration was made")
    };
    assert!(grants[0].existing && grants[0].allocation.lease_id != Some(second.id));
    let kept = h.st.service("default", &theirs.id).unwrap();
    assert_eq!((kept.lease_id, kept.revision), (theirs.lease_id, theirs.revision));
    assert_eq!(h.st.services().count(), 1);
}
