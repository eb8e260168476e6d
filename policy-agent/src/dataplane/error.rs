use std::path::PathBuf;

use crate::ebpf_object::MissingObject;

/// Errors of the dataplane layer (loading, attaching, map access).
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    MissingObject(#[from] MissingObject),
    #[error("loading the eBPF object (maps pinned under {pin_dir}): {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "kernel {found} is too old: the programs need Linux {}.{} or later (BPF atomic \
         instructions with fetch)",
        super::kernel_version::MINIMUM.0,
        super::kernel_version::MINIMUM.1
    )]
    KernelTooOld { found: String },
    #[error("the pin directory {0} is not on a bpffs mount")]
    NotBpffs(PathBuf),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching {program} to interface {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("interface {interface}: {source}")]
    Interface {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("judging translated Service traffic: {0}")]
    ServiceJudge(#[from] super::service_judge::ServiceJudgeError),
    #[error(
        "interface {interface}: link type {link_type} is neither Ethernet nor a bare IP \
         device; no uplink programs attached"
    )]
    UnsupportedLink { interface: String, link_type: u16 },
    #[error("pinned objects under {pin_dir} cannot be adopted: {detail}")]
    Incompatible { pin_dir: PathBuf, detail: String },
    #[error("map {map}: {entries} entries exceed its capacity {capacity}; nothing written")]
    OverCapacity {
        map: &'static str,
        entries: usize,
        capacity: usize,
    },
    #[error("CIDR_RULES slot {slot} holds a trie unlike the programs' template ({detail})")]
    ForeignTrie { slot: u32, detail: String },
    #[error("pinned link {path}: {detail}")]
    Link { path: PathBuf, detail: String },
    #[error("calibrating the datapath clock: {0}")]
    Clock(String),
    #[error("map {map}: mapping it into memory: {source}")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map} is not this agent's conntrack table: {detail}")]
    CtLayout { map: &'static str, detail: String },
    #[error("map {map}: every slot of a bucket is being written; entry not stored")]
    BucketBusy { map: &'static str },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DataplaneError {
    pub(crate) fn map(map: &'static str, e: aya::maps::MapError) -> Self {
        DataplaneError::Map {
            map,
            source: Box::new(e),
        }
    }
    pub(crate) fn program(program: &'static str, e: aya::programs::ProgramError) -> Self {
        DataplaneError::Program {
            program,
            source: Box::new(e),
        }
    }
}
