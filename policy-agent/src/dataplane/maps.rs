//! Typed handles to the maps of the loaded object.

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key},
};
use policy_common::{
    Addr, BindingKey, CidrData, Config, CtKey, CtValue, DEFAULT_EVENTS_BURST,
    DEFAULT_EVENTS_PER_SEC, Direction, EndpointKey, EndpointValue, EventBudget, FORMAT_VERSION,
    FragKey, FragValue, IpCacheKey, IpCacheValue, LpmKey, MAP_BINDINGS, MAP_CIDR_RULES, MAP_CONFIG,
    MAP_CONNTRACK, MAP_CONNTRACK4, MAP_COUNTERS, MAP_ENDPOINTS, MAP_EVENT_BUDGET, MAP_EVENTS,
    MAP_FRAGMENTS, MAP_IPCACHE, MAP_PORTS, MAP_RULES, MAP_SERVICE_CIDRS, MAP_SERVICE_PENDING,
    PendingKey, PendingValue, PortData, Reason, RuleKey, RuleValue, reason::COUNTERS_LEN,
    service_prefixlen,
};

use super::{DataplaneError, cidr::CidrRules, ct_table::CtTables, deny_events::DenyEvents};

/// Value stored in `PORTS` (presence is what the kernel checks).
pub const PORT_PRESENT: u8 = 1;

/// Every map of the object, typed.
pub struct DataplaneMaps {
    pub endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    /// Which addresses each pod interface carries as its pod's own (the node side's).
    pub bindings: HashMap<MapData, BindingKey, u32>,
    /// `CONNTRACK` and `CONNTRACK4`, mapped; [`DataplaneMaps::conntrack_get`] and
    /// [`DataplaneMaps::set_conntrack`] pick the table of a key's family.
    pub conntrack: CtTables,
    pub ipcache: HashMap<MapData, IpCacheKey, IpCacheValue>,
    pub rules: HashMap<MapData, RuleKey, RuleValue>,
    /// One trie per policy-set and family, behind an array of maps.
    pub cidr_rules: CidrRules,
    pub ports: LpmTrie<MapData, PortData, u8>,
    pub fragments: HashMap<MapData, FragKey, FragValue>,
    pub counters: PerCpuArray<MapData, u64>,
    pub event_budget: PerCpuArray<MapData, EventBudget>,
    pub config: Array<MapData, Config>,
    pub service_cidrs: LpmTrie<MapData, Addr, u8>,
    pub service_pending: HashMap<MapData, PendingKey, PendingValue>,
    events: Option<RingBuf<MapData>>,
    /// Whether a map write moves the policy epoch ([`DataplaneMaps::bump_policy_epoch`]).
    established: super::Established,
}

/// Verdict counters summed over CPUs: `[direction][reason]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [[u64; Reason::COUNT]; Direction::COUNT]);

impl Counters {
    pub fn get(&self, dir: Direction, reason: Reason) -> u64 {
        self.0[dir as usize][reason as usize]
    }
    /// Per-entry difference `self - earlier`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut out = Counters::default();
        for d in 0..Direction::COUNT {
            for r in 0..Reason::COUNT {
                out.0[d][r] = self.0[d][r].wrapping_sub(earlier.0[d][r]);
            }
        }
        out
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(m).map_err(|e| DataplaneError::map(name, e))
}

/// Deleting a missing key is not an error for the writer.
fn absent_ok(name: &'static str, r: Result<(), MapError>) -> Result<(), DataplaneError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(e) => Err(DataplaneError::map(name, e)),
    }
}

macro_rules! lpm {
    ($k:expr) => {
        Key::new($k.prefixlen, $k.data)
    };
}

impl DataplaneMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let config: Array<MapData, Config> = take(ebpf, MAP_CONFIG)?;
        // The conntrack tables hash with the seed their CONFIG holds (an adopted pair).
        let seed = config
            .get(&0, 0)
            .map_err(|e| DataplaneError::map(MAP_CONFIG, e))?
            .ct_seed;
        Ok(DataplaneMaps {
            endpoints: take(ebpf, MAP_ENDPOINTS)?,
            bindings: take(ebpf, MAP_BINDINGS)?,
            conntrack: CtTables::new(
                ebpf.take_map(MAP_CONNTRACK)
                    .ok_or(DataplaneError::MissingMap(MAP_CONNTRACK))?,
                ebpf.take_map(MAP_CONNTRACK4)
                    .ok_or(DataplaneError::MissingMap(MAP_CONNTRACK4))?,
                seed,
            )?,
            ipcache: take(ebpf, MAP_IPCACHE)?,
            rules: take(ebpf, MAP_RULES)?,
            cidr_rules: CidrRules::new(
                ebpf.take_map(MAP_CIDR_RULES)
                    .ok_or(DataplaneError::MissingMap(MAP_CIDR_RULES))?,
            )?,
            ports: take(ebpf, MAP_PORTS)?,
            fragments: take(ebpf, MAP_FRAGMENTS)?,
            counters: take(ebpf, MAP_COUNTERS)?,
            event_budget: take(ebpf, MAP_EVENT_BUDGET)?,
            config,
            service_cidrs: take(ebpf, MAP_SERVICE_CIDRS)?,
            service_pending: take(ebpf, MAP_SERVICE_PENDING)?,
            events: Some(take(ebpf, MAP_EVENTS)?),
            established: super::Established::default(),
        })
    }

    /// What map writes do to open connections (default: revalidate them).
    pub fn set_established(&mut self, e: super::Established) {
        self.established = e;
    }

    /// After a write of the policy maps: every conntrack entry decided before is judged
    /// again on its next packet (`Config::policy_epoch`). Nothing with `Keep`.
    pub fn bump_policy_epoch(&mut self) -> Result<(), DataplaneError> {
        if self.established == super::Established::Keep {
            return Ok(());
        }
        let mut c = self.config()?;
        c.policy_epoch = policy_common::ct::next_epoch(c.policy_epoch);
        self.set_config(c)
    }

    pub(crate) fn init_config(
        &mut self,
        calibrate: impl FnOnce() -> Result<super::clock::TickClock, DataplaneError>,
    ) -> Result<(), DataplaneError> {
        let mut c = self.config()?;
        if c.events_per_sec == 0 && c.events_burst == 0 && c.jiffy_ns == 0 {
            c.events_per_sec = DEFAULT_EVENTS_PER_SEC;
            c.events_burst = DEFAULT_EVENTS_BURST;
        }
        if c.jiffy_ns == 0 && c.ct_seed == 0 {
            // A new CONFIG, so new (empty) conntrack tables: seed their hash.
            c.ct_seed = random_seed();
            // New maps mean what this agent means (adopted ones were checked to).
            c.format = FORMAT_VERSION;
        }
        if c.jiffy_ns == 0 {
            let t = calibrate()?;
            tracing::debug!(jiffy_ns = t.jiffy_ns, "datapath clock calibrated");
            c.jiffy_ns = t.jiffy_ns;
            c.jiffies_base = t.jiffies_base;
        }
        self.set_config(c)
    }

    pub fn config(&self) -> Result<Config, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(|e| DataplaneError::map(MAP_CONFIG, e))
    }

    pub fn set_config(&mut self, c: Config) -> Result<(), DataplaneError> {
        self.conntrack.seed = c.ct_seed;
        self.config
            .set(0, c, 0)
            .map_err(|e| DataplaneError::map(MAP_CONFIG, e))
    }

    /// The deny-event budget per CPU (0 = no events); the clock settings stay.
    #[cfg(any(test, feature = "test-support"))]
    pub fn set_event_budget(&mut self, per_sec: u32, burst: u32) -> Result<(), DataplaneError> {
        let mut c = self.config()?;
        c.events_per_sec = per_sec;
        c.events_burst = burst;
        self.set_config(c)
    }

    /// The deny-event reader (once).
    pub fn take_events(&mut self) -> Option<DenyEvents> {
        self.events.take().map(DenyEvents::new)
    }

    /// One `ENDPOINTS` entry, then the generation bump that retires cached copies.
    #[cfg(any(test, feature = "test-support"))]
    pub fn set_endpoint(&mut self, k: EndpointKey, v: EndpointValue) -> Result<(), DataplaneError> {
        self.set_endpoints(&[(k, v)], &[])
    }
    #[cfg(any(test, feature = "test-support"))]
    pub fn delete_endpoint(&mut self, k: &EndpointKey) -> Result<(), DataplaneError> {
        self.set_endpoints(&[], std::slice::from_ref(k))
    }
    /// Writes `upserts`, then removes `deletes`, then bumps `Config::endpoints_gen` once: the
    /// programs' per-interface endpoint caches stop serving what these writes replaced
    /// before the caller goes on (e.g. to remove the rules an old value pointed to).
    pub fn set_endpoints(
        &mut self,
        upserts: &[(EndpointKey, EndpointValue)],
        deletes: &[EndpointKey],
    ) -> Result<(), DataplaneError> {
        if upserts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        // A failure part-way still bumps: what was written must not hide behind the caches.
        let mut r = Ok(());
        for (k, v) in upserts {
            r = self
                .endpoints
                .insert(k, v, 0)
                .map_err(|e| DataplaneError::map(MAP_ENDPOINTS, e));
            if r.is_err() {
                break;
            }
        }
        if r.is_ok() {
            for k in deletes {
                r = absent_ok(MAP_ENDPOINTS, self.endpoints.remove(k));
                if r.is_err() {
                    break;
                }
            }
        }
        let bumped = self.bump_endpoints_gen();
        r.and(bumped)
    }
    fn bump_endpoints_gen(&mut self) -> Result<(), DataplaneError> {
        let mut c = self.config()?;
        c.endpoints_gen = gray_next(c.endpoints_gen);
        self.set_config(c)
    }
    /// The (interface, address) pairs the pod hooks trust: `adds` written first, then
    /// `removes` deleted, then `Config::endpoints_gen` bumped when anything was removed, so
    /// no cached endpoint outlives the binding it was found under.
    pub fn set_bindings(
        &mut self,
        adds: &[BindingKey],
        removes: &[BindingKey],
    ) -> Result<(), DataplaneError> {
        for k in adds {
            self.bindings
                .insert(k, 1, 0)
                .map_err(|e| DataplaneError::map(MAP_BINDINGS, e))?;
        }
        let mut r = Ok(());
        for k in removes {
            r = absent_ok(MAP_BINDINGS, self.bindings.remove(k));
            if r.is_err() {
                break;
            }
        }
        if removes.is_empty() {
            return r;
        }
        // A failure part-way still bumps: a removed pair must not live on in the caches.
        let bumped = self.bump_endpoints_gen();
        r.and(bumped)
    }
    /// Every binding the kernel holds.
    pub fn bindings(&self) -> Result<Vec<BindingKey>, DataplaneError> {
        self.bindings
            .keys()
            .map(|k| k.map_err(|e| DataplaneError::map(MAP_BINDINGS, e)))
            .collect()
    }
    /// Binds `addrs` to the interface `ifindex` (for callers writing maps by hand: tests,
    /// benchmarks; the node side binds every local pod it attaches to).
    #[cfg(any(test, feature = "test-support"))]
    pub fn bind(&mut self, ifindex: u32, addrs: &[Addr]) -> Result<(), DataplaneError> {
        let adds: Vec<BindingKey> = addrs
            .iter()
            .map(|&addr| BindingKey { ifindex, addr })
            .collect();
        self.set_bindings(&adds, &[])
    }
    /// One local endpoint as the writer leaves it: its `IPCACHE` entry marked
    /// [`ipc_flags::LOCAL_ENDPOINT`] (identity kept, else [`IDENTITY_WORLD`]) first, then its
    /// `ENDPOINTS` entry. For callers writing maps by hand (tests, benchmarks); the agent
    /// writes compiled contents, which hold the same.
    #[cfg(any(test, feature = "test-support"))]
    pub fn set_local_endpoint(
        &mut self,
        k: EndpointKey,
        v: EndpointValue,
    ) -> Result<(), DataplaneError> {
        let ik = IpCacheKey { addr: k.addr };
        let mut iv = self.ipcache.get(&ik, 0).unwrap_or(IpCacheValue {
            identity: policy_common::IDENTITY_WORLD,
            flags: 0,
        });
        iv.flags |= policy_common::ipc_flags::LOCAL_ENDPOINT;
        self.set_ipcache(ik, iv)?;
        self.set_endpoint(k, v)
    }
    /// An address's identity, keeping its [`ipc_flags`] (see [`Self::set_local_endpoint`]).
    #[cfg(any(test, feature = "test-support"))]
    pub fn set_identity(&mut self, addr: Addr, identity: u32) -> Result<(), DataplaneError> {
        let k = IpCacheKey { addr };
        let flags = self.ipcache.get(&k, 0).map(|v| v.flags).unwrap_or(0);
        self.set_ipcache(k, IpCacheValue { identity, flags })
    }
    pub fn set_ipcache(&mut self, k: IpCacheKey, v: IpCacheValue) -> Result<(), DataplaneError> {
        self.ipcache
            .insert(k, v, 0)
            .map_err(|e| DataplaneError::map(MAP_IPCACHE, e))
    }
    pub fn delete_ipcache(&mut self, k: &IpCacheKey) -> Result<(), DataplaneError> {
        absent_ok(MAP_IPCACHE, self.ipcache.remove(k))
    }
    pub fn set_rule(&mut self, k: RuleKey, v: RuleValue) -> Result<(), DataplaneError> {
        self.rules
            .insert(k, v, 0)
            .map_err(|e| DataplaneError::map(MAP_RULES, e))
    }
    pub fn delete_rule(&mut self, k: &RuleKey) -> Result<(), DataplaneError> {
        absent_ok(MAP_RULES, self.rules.remove(k))
    }
    #[cfg(any(test, feature = "test-support"))]
    pub fn set_cidr_rule(
        &mut self,
        k: LpmKey<CidrData>,
        v: RuleValue,
    ) -> Result<(), DataplaneError> {
        self.cidr_rules.insert(&k, v)
    }
    #[cfg(any(test, feature = "test-support"))]
    pub fn delete_cidr_rule(&mut self, k: LpmKey<CidrData>) -> Result<(), DataplaneError> {
        self.cidr_rules.remove(&k)
    }
    /// Many CIDR rules at once: new sets' tries enter the array together.
    pub fn set_cidr_rules(
        &mut self,
        rules: &[(LpmKey<CidrData>, RuleValue)],
    ) -> Result<(), DataplaneError> {
        self.cidr_rules.insert_many(rules)
    }
    /// Many deletions at once: the tries they empty leave the array together.
    pub fn delete_cidr_rules(&mut self, keys: &[LpmKey<CidrData>]) -> Result<(), DataplaneError> {
        self.cidr_rules.remove_many(keys)
    }
    pub fn set_port(&mut self, k: LpmKey<PortData>) -> Result<(), DataplaneError> {
        self.ports
            .insert(&lpm!(k), PORT_PRESENT, 0)
            .map_err(|e| DataplaneError::map(MAP_PORTS, e))
    }
    pub fn delete_port(&mut self, k: LpmKey<PortData>) -> Result<(), DataplaneError> {
        absent_ok(MAP_PORTS, self.ports.remove(&lpm!(k)))
    }

    /// Makes the service ranges exactly `cidrs` (ClusterIP ranges: egress to them is judged
    /// on the DNAT backend).
    pub fn set_service_cidrs(&mut self, cidrs: &[ipnet::IpNet]) -> Result<(), DataplaneError> {
        let want: Vec<Key<Addr>> = cidrs
            .iter()
            .map(|net| {
                let (addr, v4) = match net.network() {
                    std::net::IpAddr::V4(a) => (Addr::from_v4_octets(a.octets()), true),
                    std::net::IpAddr::V6(a) => (Addr::from_v6_octets(a.octets()), false),
                };
                Key::new(service_prefixlen(v4, net.prefix_len()), addr)
            })
            .collect();
        let have: Vec<Key<Addr>> = self.service_cidrs.keys().filter_map(Result::ok).collect();
        for k in &have {
            if !want
                .iter()
                .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            {
                absent_ok(MAP_SERVICE_CIDRS, self.service_cidrs.remove(k))?;
            }
        }
        for k in &want {
            self.service_cidrs
                .insert(k, 1, 0)
                .map_err(|e| DataplaneError::map(MAP_SERVICE_CIDRS, e))?;
        }
        Ok(())
    }

    #[cfg(any(test, feature = "test-support"))]
    pub fn pending_get(&self, k: &PendingKey) -> Option<PendingValue> {
        self.service_pending.get(k, 0).ok()
    }

    /// The entry of a normalised key, from the map of its family.
    pub fn conntrack_get(&self, k: &CtKey) -> Option<CtValue> {
        self.conntrack.get(k)
    }
    pub fn set_conntrack(&mut self, k: CtKey, v: CtValue) -> Result<(), DataplaneError> {
        self.conntrack.set(&k, &v)
    }
    #[cfg(any(test, feature = "test-support"))]
    pub fn fragment_get(&self, k: &FragKey) -> Option<FragValue> {
        self.fragments.get(k, 0).ok()
    }

    /// Verdict counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        let mut out = Counters::default();
        for i in 0..COUNTERS_LEN {
            let per_cpu = self
                .counters
                .get(&i, 0)
                .map_err(|e| DataplaneError::map(MAP_COUNTERS, e))?;
            let sum: u64 = per_cpu.iter().copied().fold(0u64, u64::wrapping_add);
            let (d, r) = (i as usize / Reason::COUNT, i as usize % Reason::COUNT);
            out.0[d][r] = sum;
        }
        Ok(out)
    }

    /// Empties every policy and state map at once, outside the writer's order. Tests only,
    /// like every single-entry writer here: enforcing maps change only through
    /// `writer::apply`, whose order no single write can keep.
    #[cfg(any(test, feature = "test-support"))]
    pub fn clear_all(&mut self) -> Result<(), DataplaneError> {
        fn clear<K: aya::Pod, V: aya::Pod>(
            name: &'static str,
            m: &mut HashMap<MapData, K, V>,
        ) -> Result<(), DataplaneError> {
            let keys: Vec<K> = m.keys().filter_map(Result::ok).collect();
            for k in keys {
                absent_ok(name, m.remove(&k))?;
            }
            Ok(())
        }
        fn clear_lpm<K: aya::Pod, V: aya::Pod>(
            name: &'static str,
            m: &mut LpmTrie<MapData, K, V>,
        ) -> Result<(), DataplaneError> {
            let keys: Vec<Key<K>> = m.keys().filter_map(Result::ok).collect();
            for k in keys {
                absent_ok(name, m.remove(&k))?;
            }
            Ok(())
        }
        clear(MAP_ENDPOINTS, &mut self.endpoints)?;
        clear(MAP_BINDINGS, &mut self.bindings)?;
        self.bump_endpoints_gen()?;
        self.conntrack.clear();
        clear(MAP_IPCACHE, &mut self.ipcache)?;
        clear(MAP_RULES, &mut self.rules)?;
        clear(MAP_FRAGMENTS, &mut self.fragments)?;
        clear(MAP_SERVICE_PENDING, &mut self.service_pending)?;
        self.cidr_rules.clear()?;
        clear_lpm(MAP_PORTS, &mut self.ports)?;
        clear_lpm(MAP_SERVICE_CIDRS, &mut self.service_cidrs)?;
        Ok(())
    }
}

/// The next value of a Gray-code counter: it differs from `g` in exactly one bit. The
/// kernel copies a whole `CONFIG` value in on update, in no guaranteed unit; a program that
/// reads `endpoints_gen` during the copy sees each byte old or new, so with one bit changed
/// it sees the old or the new generation, never a third value that an old cache slot holds.
pub fn gray_next(g: u64) -> u64 {
    // Gray -> binary (prefix XOR), +1, binary -> Gray.
    let mut n = g;
    let mut shift = 1;
    while shift < 64 {
        n ^= n >> shift;
        shift <<= 1;
    }
    let n = n.wrapping_add(1);
    n ^ (n >> 1)
}

/// A random non-zero seed for the conntrack hash.
fn random_seed() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: writes at most 4 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 4, 0) };
    let s = u32::from_ne_bytes(b);
    if n == 4 && s != 0 {
        s
    } else {
        // Without entropy, the clock: unpredictable enough to spread an attacker's guess.
        monotonic_coarse_ns() as u32 | 1
    }
}

/// `CLOCK_MONOTONIC_COARSE` in ns. Not the clock of the maps' stamps: that is
/// [`super::Dataplane::now_ns`] (see `clock`).
pub fn monotonic_coarse_ns() -> u64 {
    // SAFETY: all-zero is a valid timespec; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::gray_next;

    #[test]
    fn endpoints_generation_changes_one_bit_per_bump_and_never_repeats() {
        let mut seen = std::collections::HashSet::new();
        let mut g = 0u64;
        for _ in 0..100_000 {
            assert!(seen.insert(g), "{g:#x} repeated");
            let n = gray_next(g);
            assert_eq!((n ^ g).count_ones(), 1, "{g:#x} -> {n:#x}");
            g = n;
        }
        // Far along the sequence too.
        let g = 0x8000_0000_0000_0000u64 ^ 0x4000_0000_0000_0000;
        assert_eq!((gray_next(g) ^ g).count_ones(), 1);
    }
}
