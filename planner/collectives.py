"""Seconds of one collective on a cluster: intra-node, or hierarchical across nodes.

A group of `group` ranks whose members are `stride` rank ids apart (the rank grid is
(pp, dp, sp, tp) with tp innermost, so a dp x sp group has stride tp). Inside one node the
collective runs at the node's bandwidth. Across nodes it runs as NCCL's hierarchical
algorithms do: the members of each node reduce-scatter / all-gather among themselves over
NVLink, and each member exchanges its 1/per_node share with its peers on the other nodes
over its own NIC (`inter_node_bw` is per device), so the inter-node step moves 1/per_node
of the buffer. An all-to-all has no such reduction: the share of its data addressed to
other nodes crosses the NICs. Each call pays a fixed latency (NCCL's launch + handshake:
`CostParams.gpu_collective_latency_s`, or the node's measured one on CPU nodes) and a
further inter-node latency when it leaves the node.
"""

from __future__ import annotations

from planner.hardware import HardwareSpec


def call_latency(hw: HardwareSpec, default_s: float) -> float:
    """Per-call latency inside a node: measured (`probe`) when known, else `default_s`
    on GPUs and 0 elsewhere."""
    if hw.intra_node_latency_s:
        return hw.intra_node_latency_s
    return 0.0 if hw.device_name.lower() == "cpu" else default_s


def collective_seconds(hw: HardwareSpec, kind: str, sent_bytes: float, group: int, stride: int,
                       calls: float, *, intra_bw: float, inter_bw: float, latency_s: float,
                       inter_latency_s: float) -> float:
    """Seconds of `calls` collectives of `kind` whose bytes one rank sends sum to
    `sent_bytes` ((g-1)/g of the buffer; twice that for an all-reduce), over a group of
    `group` ranks `stride` apart. `intra_bw` / `inter_bw` are achieved bytes/s one rank
    sends (NVLink: half its bidirectional datasheet figure)."""
    if group <= 1:
        return 0.0
    span = group * stride
    if span <= hw.devices_per_node:
        return sent_bytes / intra_bw + calls * latency_s
    per_node = max(1, min(group, hw.devices_per_node // max(1, stride)))
    nodes = group / per_node
    if kind == "all_to_all":
        local = (per_node - 1) / (group - 1)
        seconds = sent_bytes * local / intra_bw + sent_bytes * (1 - local) / inter_bw
    else:
        full = sent_bytes * group / (group - 1)
        seconds = (full * (per_node - 1) / per_node / intra_bw
                   + full / per_node * (nodes - 1) / nodes / inter_bw)
    return seconds + calls * (latency_s + inter_latency_s)
