//! kube-proxy's part in a test bed: Service virtual IPs DNATed to their backends by
//! iptables in the node namespace.

use std::io;
use std::net::IpAddr;

use super::netns::Netns;

/// DNATs `vip:port` (TCP and UDP, from pods and from the node itself) to
/// `backend:backend_port`, as kube-proxy's iptables mode does.
pub fn dnat(
    node: &Netns,
    vip: IpAddr,
    port: u16,
    backend: IpAddr,
    backend_port: u16,
) -> io::Result<()> {
    let (tool, to) = match backend {
        IpAddr::V4(_) => ("iptables", format!("{backend}:{backend_port}")),
        IpAddr::V6(_) => ("ip6tables", format!("[{backend}]:{backend_port}")),
    };
    let (vip, port) = (vip.to_string(), port.to_string());
    for chain in ["PREROUTING", "OUTPUT"] {
        for proto in ["tcp", "udp"] {
            node.exec(
                tool,
                &[
                    "-w",
                    "5",
                    "-t",
                    "nat",
                    "-A",
                    chain,
                    "-d",
                    &vip,
                    "-p",
                    proto,
                    "--dport",
                    &port,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to,
                ],
            )?;
        }
    }
    Ok(())
}
