//! Stable numbers for identities, policy-sets, port-sets and endpoints: a key keeps its
//! number for as long as it stays live, so a recompile rewrites only what changed.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
pub struct Numbering<K: Ord> {
    by_key: BTreeMap<K, u32>,
    free: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl<K: Ord + Clone> Numbering<K> {
    /// Numbers in `first..limit`.
    pub fn new(first: u32, limit: u32) -> Self {
        Numbering {
            by_key: BTreeMap::new(),
            free: BTreeSet::new(),
            next: first,
            limit,
        }
    }

    pub fn get(&self, k: &K) -> Option<u32> {
        self.by_key.get(k).copied()
    }

    /// Frees the numbers of keys not in `live`, then numbers the new keys in order (lowest
    /// free number first). Keys beyond the number space get none.
    pub fn sync<'a>(&mut self, live: impl Iterator<Item = &'a K> + Clone)
    where
        K: 'a,
    {
        let keep: BTreeSet<&K> = live.clone().collect();
        let dead: Vec<K> = self
            .by_key
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for k in dead {
            if let Some(n) = self.by_key.remove(&k) {
                self.free.insert(n);
            }
        }
        for k in keep {
            if !self.by_key.contains_key(k)
                && let Some(n) = self.alloc()
            {
                self.by_key.insert(k.clone(), n);
            }
        }
    }

    /// Numbers one key (if new) without freeing anything.
    pub fn insert(&mut self, k: &K) -> Option<u32> {
        if let Some(n) = self.by_key.get(k) {
            return Some(*n);
        }
        let n = self.alloc()?;
        self.by_key.insert(k.clone(), n);
        Some(n)
    }

    /// Gives `from`'s number to `to` (a table that changed in place keeps its number).
    pub fn rename(&mut self, from: &K, to: K) {
        if let Some(n) = self.by_key.remove(from) {
            self.by_key.insert(to, n);
        }
    }

    /// Frees one key's number.
    pub fn remove(&mut self, k: &K) {
        if let Some(n) = self.by_key.remove(k) {
            self.free.insert(n);
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        if let Some(n) = self.free.pop_first() {
            return Some(n);
        }
        if self.next >= self.limit {
            return None;
        }
        self.next += 1;
        Some(self.next - 1)
    }
}
