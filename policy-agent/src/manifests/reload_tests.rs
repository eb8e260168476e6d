//! [`DirLoader::reload`]: an update in place equals a whole parse of the same bytes, and
//! the whole path is taken whenever the in-place one could differ.

use std::path::{Path, PathBuf};

use super::{DirLoader, Manifests, Reload};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("manifest-reload-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn pod(ns: &str, name: &str, app: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
         spec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
    )
}

fn policy(ns: &str, name: &str, from: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{podSelector: {{}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]}}]}}\n"
    )
}

/// A policy with an invalid part (kept fail-closed, a problem but no object dropped).
fn lowercase_protocol(ns: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: lower, namespace: {ns}}}\n\
         spec: {{podSelector: {{}}, ingress: [{{ports: [{{protocol: tcp, port: 80}}]}}]}}\n"
    )
}

fn docs(d: &[String]) -> String {
    d.join("---\n")
}

/// Everything a reader of [`Manifests`] sees, as text.
fn seen(m: &Manifests) -> String {
    let problems: Vec<String> = m.problems.iter().map(ToString::to_string).collect();
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{}\n{}\n{problems:#?}",
        m.namespaces, m.pods, m.policies, m.lockdown, m.generation, m.objects
    )
}

/// Reloads `dir` into `kept` and checks the result against a whole parse by `reference`
/// (a loader with the same history: the same last good versions); returns whether it was
/// done in place.
fn reload_matches(
    loader: &mut DirLoader,
    reference: &mut DirLoader,
    kept: &mut Manifests,
    dir: &Path,
) -> bool {
    let in_place = match loader.reload(dir, Some(kept)).expect("reload") {
        Reload::Unchanged => false,
        Reload::Whole(m) => {
            *kept = m;
            false
        }
        Reload::InPlace(_) => true,
    };
    let whole = reference.load(dir).expect("load");
    assert_eq!(seen(kept), seen(&whole), "in place: {in_place}");
    in_place
}

#[test]
fn an_update_in_place_equals_a_whole_parse() {
    let dir = scratch("equal");
    let w = |name: &str, text: String| std::fs::write(dir.join(name), text).expect("write");
    w(
        "a.yaml",
        docs(&[
            pod("x", "a1", "web", "198.18.0.1"),
            pod("x", "a2", "db", "198.18.0.2"),
        ]),
    );
    w(
        "b.yaml",
        docs(&[policy("x", "p", "web"), lowercase_protocol("x")]),
    );
    w("c.yaml", pod("y", "c1", "web", "198.18.0.3"));
    let mut loader = DirLoader::default();
    let mut reference = DirLoader::default();
    reference.load(&dir).expect("load");
    let mut kept = match loader.reload(&dir, None).expect("first") {
        Reload::Whole(m) => m,
        other => panic!("first read: {other:?}"),
    };
    // A policy changed.
    w(
        "b.yaml",
        docs(&[policy("x", "p", "db"), lowercase_protocol("x")]),
    );
    assert!(
        reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "a changed policy"
    );
    // A new file with a pod, then a pod gone from another file.
    w("d.yaml", pod("z", "d1", "web", "198.18.0.4"));
    assert!(
        reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "a new file"
    );
    w("a.yaml", pod("x", "a1", "web", "198.18.0.1"));
    assert!(
        reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "a pod removed"
    );
    // Two pods claiming one address (a problem listed after every file's own).
    w("d.yaml", pod("z", "d1", "web", "198.18.0.3"));
    assert!(
        reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "a shared address"
    );
    std::fs::remove_file(dir.join("d.yaml")).expect("delete");
    assert!(
        reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "a file deleted"
    );
    // Nothing changed.
    assert!(matches!(
        loader.reload(&dir, Some(&mut kept)).expect("reload"),
        Reload::Unchanged
    ));
    // Defined twice: the whole path (first in file order wins), and after it is fixed.
    w("e.yaml", pod("x", "a1", "api", "198.18.0.9"));
    assert!(
        !reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "a duplicate"
    );
    std::fs::remove_file(dir.join("e.yaml")).expect("delete");
    assert!(
        !reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "after a duplicate"
    );
    // A file turning bad: its last good version, through the whole path.
    w("b.yaml", "kind: [".into());
    assert!(
        !reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "a bad file"
    );
    w("b.yaml", policy("x", "p", "web"));
    assert!(
        !reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "after a bad file"
    );
    w("c.yaml", pod("y", "c1", "db", "198.18.0.3"));
    assert!(
        reload_matches(&mut loader, &mut reference, &mut kept, &dir),
        "in place again"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_object_limit_takes_the_whole_path() {
    let dir = scratch("limit");
    let limits = super::Limits {
        max_objects: 2,
        ..super::Limits::default()
    };
    std::fs::write(dir.join("a.yaml"), pod("x", "a1", "web", "198.18.0.1")).expect("write");
    let mut loader = DirLoader::with_limits(limits);
    let Reload::Whole(mut kept) = loader.reload(&dir, None).expect("first") else {
        panic!("first read is whole");
    };
    std::fs::write(
        dir.join("b.yaml"),
        docs(&[policy("x", "p", "web"), policy("x", "q", "db")]),
    )
    .expect("write");
    let r = loader.reload(&dir, Some(&mut kept)).expect("reload");
    let Reload::Whole(m) = r else {
        panic!("over the limit: {r:?}");
    };
    let whole = DirLoader::with_limits(limits).load(&dir).expect("load");
    assert_eq!(seen(&m), seen(&whole));
    let _ = std::fs::remove_dir_all(&dir);
}
