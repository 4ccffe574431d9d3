#!/bin/sh
# Run a command in a throw-away virtual machine that sees this machine's files.
#
# For the one figure a sandbox may not allow: 50,000 connections held by one
# process need RLIMIT_NOFILE above 50,000, which an unprivileged container (or
# one without CAP_SYS_RESOURCE) cannot raise. The guest is a Debian kernel with
# this machine's root file system mounted read-only over virtio-9p, a tmpfs on
# /tmp, loopback only, and root with every capability, so the benchmark can
# raise its own limits. Its output goes to this terminal; the guest powers off
# when the command ends.
#
#   sh benchmarks/in_vm.sh [-m MEM] [-c CPUS] [-o DIR] -- COMMAND ...
#   sh benchmarks/in_vm.sh -o benchmarks/results -- /work/venv/bin/python -m \
#       benchmarks.compare --stacks tidings --subscribers 1 --idle 0 \
#       --latency-seconds 0 --huge --json benchmarks/results/compare-huge-vm.json
#
# Needs, from Debian: qemu-system-x86 linux-image-amd64 busybox. The guest runs
# under qemu's software emulation, many times slower than the host (its time
# figures are not comparable with the host's; its memory figures are), or with
# -k under KVM where nested KVM works (on the 2-vCPU Firecracker VMs of this
# project it does not: the guest kernel hangs at boot). The command runs in the
# current directory (which must be on the root file system); it can write to
# /tmp (lost at the end) and to DIR (-o: this machine's folder, read-write).
set -eu

MEM=6G
CPUS=$(nproc)
OUT=
ACCEL="-accel tcg,thread=multi -cpu max"
while [ $# -gt 0 ]; do
    case "$1" in
        -m) MEM=$2; shift 2 ;;
        -c) CPUS=$2; shift 2 ;;
        -o) OUT=$(realpath "$2"); shift 2 ;;
        -k) ACCEL="-enable-kvm -cpu host"; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || { echo "usage: $0 [-m MEM] [-c CPUS] -- COMMAND ..." >&2; exit 2; }
KERNEL=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -1)
[ -n "$KERNEL" ] || { echo "$0: no kernel in /boot (apt-get install linux-image-amd64)" >&2; exit 2; }
VERSION=${KERNEL#/boot/vmlinuz-}
MODULES=/lib/modules/$VERSION
command -v qemu-system-x86_64 >/dev/null || { echo "$0: apt-get install qemu-system-x86" >&2; exit 2; }
BUSYBOX=$(command -v busybox) || { echo "$0: apt-get install busybox" >&2; exit 2; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/initramfs
mkdir -p "$ROOT/bin" "$ROOT/mods" "$ROOT/newroot" "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"
cp "$BUSYBOX" "$ROOT/bin/busybox"
for lib in $(ldd "$BUSYBOX" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp "$lib" "$ROOT$lib"
done
# virtio-pci and 9p, in load order
for mod in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
           netfs fscache 9pnet 9pnet_virtio 9p; do
    file=$(modinfo -k "$VERSION" -n "$mod")
    case "$file" in
        *.xz) xz -dc "$file" > "$ROOT/mods/$mod.ko" ;;
        *.zst) zstd -dcq "$file" > "$ROOT/mods/$mod.ko" ;;
        *) cp "$file" "$ROOT/mods/$mod.ko" ;;
    esac
done
# the command, quoted for the guest's shell
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
    echo "cd $(quote "$PWD") || exit 1"
    echo "export HOME=/tmp PATH=$(quote "$PATH")"
    echo "ulimit -n 1048576"
    printf 'exec'
    for arg in "$@"; do printf ' %s' "$(quote "$arg")"; done
    echo
} > "$ROOT/command.sh"
cat > "$ROOT/init" <<EOF
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for mod in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \\
           netfs fscache 9pnet 9pnet_virtio 9p; do
    /bin/busybox insmod /mods/\$mod.ko 2>/dev/null
done
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /newroot \\
    || { echo "in_vm: cannot mount the host's files"; /bin/busybox poweroff -f; }
/bin/busybox mount -t proc proc /newroot/proc
/bin/busybox mount -t sysfs sys /newroot/sys
/bin/busybox mount -t devtmpfs dev /newroot/dev
/bin/busybox mount -t tmpfs tmp /newroot/tmp
/bin/busybox mount -t tmpfs run /newroot/run 2>/dev/null
/bin/busybox mount -t devpts devpts /newroot/dev/pts 2>/dev/null
if [ -n "$OUT" ]; then
    /bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "/newroot$OUT" \
        || echo "in_vm: cannot mount $OUT read-write"
fi
/bin/busybox ip link set lo up
/bin/busybox ip addr add 127.0.0.1/8 dev lo 2>/dev/null
echo "in_vm: guest up, \$(/bin/busybox nproc) CPUs, \$(/bin/busybox awk '/MemTotal/ {print \$2}' /proc/meminfo) kB"
/bin/busybox cp /command.sh /newroot/tmp/in_vm_command.sh
/bin/busybox chroot /newroot /bin/sh /tmp/in_vm_command.sh
echo "in_vm: exit status \$?"
/bin/busybox poweroff -f
EOF
chmod +x "$ROOT/init"
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initramfs.gz"

# shellcheck disable=SC2086  # ACCEL is several words
qemu-system-x86_64 $ACCEL -smp "$CPUS" -m "$MEM" -nographic -no-reboot \
    -kernel "$KERNEL" -initrd "$WORK/initramfs.gz" \
    -append "console=ttyS0 quiet panic=-1 rdinit=/init" \
    -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
    ${OUT:+-virtfs local,path=$OUT,mount_tag=out,security_model=none} \
    -nic none
