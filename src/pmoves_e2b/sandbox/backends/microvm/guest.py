"""What runs inside the microVM before envd: the initramfs's ``/init`` (busybox sh) and the guest's
pid 1 (python3 from the template, or envd's runtime's in templates from any image), as text copied into the initramfs by ``image.py``.

The initramfs loads the virtio modules (Debian's cloud kernel has them as modules), mounts every
template layer (one read-only erofs disk each, topmost first) under the sandbox's writable ext4 disk
as an overlayfs, configures the guest side of the tap (fixed addresses: every VM looks the same, so a
snapshot of one can be restored in any sandbox's netns) and switches to the template's rootfs.
The guest's pid 1 mounts what bwrap mounts for an ns sandbox, starts envd's launcher and reaps
orphans; when the launcher ends, the VM ends. It also keeps the clock right after a snapshot restore:
the RTC follows the host's clock, the guest's system clock continues from the moment of the snapshot.
"""

from __future__ import annotations

from pmoves_e2b.sandbox.templates.runtime import RUNTIME_DIR, RUNTIME_PYTHON

GUEST_ADDRESS = "172.31.255.2"
TAP_ADDRESS = "172.31.255.1"
PREFIX = 30
# The tap's MAC is fixed too: a restored guest's ARP cache already holds it.
TAP_MAC = "02:e2:b0:00:00:01"
GUEST_MAC = "02:e2:b0:00:00:02"
# The cloud kernel has none of them built in; image.py adds their dependencies, in load order.
MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "erofs", "overlay")
READY_MARKER = "pmoves-vm: envd started"
# UDP port of the guest's pid 1 for the host's word after a restore (clock, entropy)
CONTROL_PORT = 49900
RESTORED_MARKER = "pmoves-vm: restored, clock set and entropy added"

INIT_SH = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "pmoves-vm: $*" >/dev/console; sync; reboot -f; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || fail "insmod $m"; done
. /config
letters=abcdefghijklmnopqrstuvwxyz
i=0
lower=
while [ $i -lt "$LAYERS" ]; do
    dev=/dev/vd$(echo $letters | cut -c$((i + 1)))
    n=0; while [ ! -b $dev ]; do n=$((n + 1)); [ $n -gt 500 ] && fail "no $dev"; usleep 10000; done
    mkdir -p /layers/$i
    mount -t erofs -o ro $dev /layers/$i || fail "mount layer $i"
    lower=$lower${{lower:+:}}/layers/$i
    i=$((i + 1))
done
dev=/dev/vd$(echo $letters | cut -c$((LAYERS + 1)))
n=0; while [ ! -b $dev ]; do n=$((n + 1)); [ $n -gt 500 ] && fail "no $dev"; usleep 10000; done
mkdir -p /rw
mount -t ext4 -o noatime $dev /rw || fail "mount the disk"
mkdir -p /rw/upper /rw/work
mkdir -p /newroot
mount -t overlay overlay -o lowerdir=$lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay"
ip link set lo up
ip addr add {GUEST_ADDRESS}/{PREFIX} dev eth0
ip link set eth0 up
ip route add default via {TAP_ADDRESS}
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "mount /run"
mkdir -m 0700 /newroot/run/pmoves-vm
cp /config /pmoves-init.py /newroot/run/pmoves-vm/
mount --move /dev /newroot/dev
umount /sys /proc
# pid 1's python: a template from any OCI image has envd's runtime (its python3.11 and glibc, run by
# their own loader), as envd itself there; the image's python3 may be missing or another version
py="/usr/bin/python3"
[ -x /newroot{RUNTIME_DIR}/bin/python3.11 ] && py="{RUNTIME_PYTHON}"
exec switch_root /newroot $py -S /run/pmoves-vm/pmoves-init.py
"""

PID1_PY = f'''import ctypes, fcntl, os, select, signal, socket, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def mount(src, target, fstype, flags=0, data=""):
    os.makedirs(target, exist_ok=True)
    if libc.mount(src.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        print("pmoves-vm: mount", target, os.strerror(ctypes.get_errno()), file=sys.stderr)
conf = {{}}
for line in open("/run/pmoves-vm/config"):
    key, _, value = line.strip().partition("=")
    conf[key] = value.strip("'")
mount("proc", "/proc", "proc", 0xE)  # nosuid nodev noexec
mount("sysfs", "/sys", "sysfs", 0xE)
# envd's own cgroup2 group at /sys/fs/cgroup, as the ns tier delegates it: pids.max bounds the
# sandbox (a fork bomb fails there, not in the guest's kernel tables), per-command groups below it
mount("cgroup2", "/run/pmoves-vm/cgroup", "cgroup2", 0xE)
os.makedirs("/run/pmoves-vm/cgroup/sandbox", exist_ok=True)
with open("/run/pmoves-vm/cgroup/cgroup.subtree_control", "w") as f:
    f.write("+pids")
with open("/run/pmoves-vm/cgroup/sandbox/pids.max", "w") as f:
    f.write(conf["PIDS_MAX"])
mount("/run/pmoves-vm/cgroup/sandbox", "/sys/fs/cgroup", "none", 0x1000)  # MS_BIND
mount("devpts", "/dev/pts", "devpts", 0xA, "newinstance,ptmxmode=0666,mode=620,gid=5")
mount("tmpfs", "/dev/shm", "tmpfs", 0x6, "mode=1777,size=" + conf["SHM_BYTES"])
socket.sethostname("e2b")
env = {{"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
       "LANG": "C.UTF-8", "ENVD_INIT_SECRET": conf["SECRET"], "ENVD_PIDS_MAX": conf["PIDS_MAX"], "PWD": "/"}}
console = os.open("/dev/console", os.O_WRONLY)
# the host's word after a snapshot restore: the time and fresh entropy (every restored VM starts
# with the same random pool); only the host can send from outside the guest, and nobody inside
# but root can forge a source address
control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
control.bind(("{GUEST_ADDRESS}", {CONTROL_PORT}))
pid = os.fork()
if pid == 0:
    os.setsid()
    control.close()
    with open("/sys/fs/cgroup/cgroup.procs", "w") as f:
        f.write("0")
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    os.dup2(console, 1); os.dup2(console, 2)
    os.chdir("/")
    os.execve("/opt/pmoves/bin/envd", ["/opt/pmoves/bin/envd", "--host", "0.0.0.0", "--port", "49983"], env)
os.write(console, b"{READY_MARKER}\\n")
class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]
def set_clock(ns):
    libc.clock_settime(0, ctypes.byref(timespec(ns // 10**9, ns % 10**9)))
def restored(message):
    _, ns, entropy = message.split(b" ", 2)
    set_clock(int(ns))
    seed = bytes.fromhex(entropy.decode())
    with open("/dev/random", "wb") as random:
        fcntl.ioctl(random, 0x40085203, struct.pack("ii", len(seed) * 8, len(seed)) + seed)  # RNDADDENTROPY
        fcntl.ioctl(random, 0x5207)  # RNDRESEEDCRNG
def rtc_seconds():
    try:
        with open("/sys/class/rtc/rtc0/since_epoch") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None
while True:
    while True:
        try:
            done, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done == 0:
            break
        if done == pid:
            os.write(console, b"pmoves-vm: envd launcher ended, powering off\\n")
            os.sync()
            libc.reboot(0x01234567)
    if select.select([control], [], [], 0.2)[0]:
        message, sender = control.recvfrom(512)
        if sender[0] != "{GUEST_ADDRESS}" and not sender[0].startswith("127.") and message.startswith(b"restored "):
            try:
                restored(message)
                os.write(console, b"{RESTORED_MARKER}\\n")
                control.sendto(b"ok", sender)
            except (OSError, ValueError) as exc:
                control.sendto(b"error " + str(exc).encode(), sender)
    rtc = rtc_seconds()
    # a VM left paused: the system clock stood still, the RTC (which follows the host's) did not
    if rtc is not None and abs(rtc - time.time()) > 2:
        set_clock(rtc * 10**9)
'''

# /probe: the accelerator probe's whole guest (qemu.kvm_boots)
PROBE_MARKER = "pmoves-vm: probe booted"
PROBE_SH = f"""#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox echo "{PROBE_MARKER}" >/dev/ttyS0
/bin/busybox reboot -f
"""
