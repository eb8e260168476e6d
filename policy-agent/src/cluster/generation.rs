//! One number for "which objects this pass enforced", the cluster mode's counterpart of the
//! manifest directory's content hash: every cached object's kind, namespace, name, uid and
//! resourceVersion, hashed and summed (so the order objects come in does not matter).
//!
//! Whoever knows what the API server holds (a test's fake server, a script reading the
//! objects) computes the same number and waits for the status file to name it. A re-list
//! that brings the same versions gives the same number; any change to any object changes it.

use kube::Resource;

use super::snapshot::Objects;

/// The sum of the objects' hashes; [`Generation::value`] is the number reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generation(u64);

impl Generation {
    /// Adds one object. `kind` is the resource's plural (`pods`, `namespaces`,
    /// `networkpolicies`).
    pub fn add(&mut self, kind: &str, namespace: &str, name: &str, uid: &str, version: &str) {
        // FNV-1a over the fields, each ended by a 0 byte (no field holds one), then a
        // finalizer so that summing the hashes of similar objects does not cancel out.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for field in [kind, namespace, name, uid, version] {
            for b in field.bytes().chain([0]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        self.0 = self.0.wrapping_add(mix(h));
    }

    pub fn value(self) -> u64 {
        self.0
    }

    /// The generation of what the caches hold.
    pub fn of(objects: &Objects) -> Generation {
        let mut g = Generation::default();
        add_all(&mut g, "pods", &objects.pods);
        add_all(&mut g, "namespaces", &objects.namespaces);
        add_all(&mut g, "networkpolicies", &objects.policies);
        g
    }
}

fn add_all<R: Resource>(g: &mut Generation, kind: &str, objects: &[std::sync::Arc<R>]) {
    for o in objects {
        let m = o.meta();
        let s = |v: &Option<String>| v.clone().unwrap_or_default();
        g.add(
            kind,
            &s(&m.namespace),
            &s(&m.name),
            &s(&m.uid),
            &s(&m.resource_version),
        );
    }
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::Generation;

    fn of(objs: &[[&str; 5]]) -> u64 {
        let mut g = Generation::default();
        for [k, ns, n, uid, v] in objs {
            g.add(k, ns, n, uid, v);
        }
        g.value()
    }

    #[test]
    fn order_does_not_matter_and_every_field_does() {
        let a = ["pods", "x", "a", "u1", "7"];
        let b = ["networkpolicies", "x", "deny", "u2", "9"];
        assert_eq!(of(&[a, b]), of(&[b, a]));
        for i in 0..5 {
            let mut c = a;
            c[i] = "other";
            assert_ne!(of(&[c, b]), of(&[a, b]), "field {i}");
        }
        // Fields do not run into each other.
        assert_ne!(
            of(&[["pods", "xa", "", "u1", "7"]]),
            of(&[["pods", "x", "a", "u1", "7"]])
        );
        assert_ne!(of(&[a]), of(&[a, a]));
        assert_ne!(of(&[]), of(&[a]));
    }
}
