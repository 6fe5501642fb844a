"""What a sandbox backend may leave behind on the host, for tests to assert on.

``ns_leftovers`` lists remains of ns-backend sandboxes that belong to one runtime dir (and the
slots the test used): netns, veths, mounts, dirs, cgroups, slot files, nft set elements and
processes running under the slots' uid ranges. An empty list means nothing leaked.
"""

from __future__ import annotations

import os
from pathlib import Path

from pmoves_e2b.sandbox.backends.ns import cgroups, network
from pmoves_e2b.sandbox.backends.ns.slots import SLOTS_DIR, UID_BASE, UID_RANGE, SlotRegistry


def _mountpoints_under(root: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mountpoint = line.split()[4]
        if mountpoint.startswith(f"{root}/"):
            found.append(mountpoint)
    return found


def _loop_devices_under(root: Path) -> list[tuple[str, str]]:
    """Loop devices still bound to a file under ``root`` (a sandbox's disk image)."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip()
        except OSError:
            continue  # detached meanwhile
        if path.startswith(f"{root}/"):
            found.append((backing.parent.parent.name, path))
    return found


def _in_other_backends_group(pid: str, cgroup_parent_name: str) -> bool:
    """A process of another backend instance that got one of our released slots meanwhile."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return "/pmoves-e2b-" in text and f"/{cgroup_parent_name}/" not in text


def _processes_in_uid_ranges(slots: set[int], cgroup_parent_name: str) -> list[str]:
    ranges = [(UID_BASE + UID_RANGE * s, UID_BASE + UID_RANGE * (s + 1)) for s in slots]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        # a zombie holds nothing but its pid and is reaped by its parent (the host's init here)
        zombie = fields["State"].split()[0] == "Z"
        ours = any(low <= uid < high for low, high in ranges)
        if ours and not zombie and not _in_other_backends_group(entry, cgroup_parent_name):
            found.append(f"process {entry} uid {uid}")
    return found


def ns_leftovers(
    runtime_dir: Path,
    cgroup_parent_name: str,
    id_prefix: str,
    slots: set[int],
    host_setup_mounts: tuple[Path, ...] = (),
    peer_roots: tuple[Path, ...] = (),
    kept: set[int] | None = None,
) -> list[str]:
    """Remains of sandboxes whose ids start with ``id_prefix`` / that used ``slots``; mounts are
    looked for under ``runtime_dir`` and ``peer_roots`` (its peer mounts); with
    ``host_setup_mounts`` also the backend's own mounts and cgroup parents (after ``close()``).
    ``kept``: slots whose netns the backend keeps for its next sandbox (``free_slots()``): their slot
    file must say so, and their veth and netns are the backend's, not a leftover."""
    runtime_dir = runtime_dir.resolve()
    # nft elements before the owners: a backend adds an address's elements only after taking its
    # slot, so an element of a slot another backend took meanwhile shows up with that owner below
    internet, egress = network.internet_addresses(), network.egress_addresses()
    owners = SlotRegistry(SLOTS_DIR).owners()
    # a released slot may already serve another backend's sandbox (shared host): not ours to judge
    slots = {s for s in slots if owners.get(s, {}).get("runtime_dir", str(runtime_dir)) == str(runtime_dir)}
    kept = kept or set()
    left: list[str] = [f"kept slot {s} not marked free" for s in sorted(kept) if not owners.get(s, {}).get("free")]
    addresses = {network.SandboxNet.for_slot(s, "x").address for s in slots | kept}
    slots -= kept
    for name in network.list_netns():
        free = network.free_slot_of(name)
        owner = owners.get(free, {}) if free is not None else {}
        if free is not None and free not in kept and owner.get("runtime_dir", str(runtime_dir)) == str(runtime_dir):
            left.append(f"netns {name}")
    left += [f"netns {name}" for name in network.list_netns() if name.startswith(network.NETNS_PREFIX + id_prefix)]
    left += [f"veth e2bh{s}" for s in slots if Path(f"/sys/class/net/e2bh{s}").exists()]
    left += [f"mount {m}" for root in (runtime_dir, *peer_roots) for m in _mountpoints_under(root)]
    left += [f"loop device {dev} ({path})" for dev, path in _loop_devices_under(runtime_dir)]
    if runtime_dir.exists():
        left += [f"dir {p}" for p in runtime_dir.iterdir()]
    parents = cgroups.existing_parent_dirs(cgroup_parent_name)
    for parent in parents:
        left += [f"cgroup {parent / name}" for name in os.listdir(parent) if (parent / name).is_dir()]
    if host_setup_mounts:
        left += [f"cgroup parent {p}" for p in parents]
        mounted = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
        left += [f"mount {m}" for m in host_setup_mounts if str(m) in mounted]
    left += [
        f"slot {s}" for s, owner in owners.items() if owner.get("runtime_dir") == str(runtime_dir) and s not in kept
    ]
    left += [f"nft internet4 {a}" for a in sorted(addresses & internet)]
    left += [f"nft egress4 {a}" for a in sorted(addresses & egress)]
    left += _processes_in_uid_ranges(slots, cgroup_parent_name)
    return left
