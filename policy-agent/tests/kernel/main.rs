//! The kernel programs on crafted packets through BPF_PROG_TEST_RUN (root: BPF).

mod common;

mod kernel_datapath;
