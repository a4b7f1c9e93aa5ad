#!/usr/bin/env bash
# run-in-rxe-vm.sh - run a command inside a throw-away qemu VM whose (Debian)
# kernel has Soft-RoCE ready: rxe0 on dummy0 (10.77.0.1/24), /dev/infiniband/*
# present, RLIMIT_MEMLOCK unlimited, running as root.
#
# The host root filesystem is shared read-only (9p) with a tmpfs overlay on top,
# so host binaries (node, .node addons, rdma-core tools) run unchanged; the
# current directory is shared read-write at the same path. The command's stdout
# and stderr are streamed; the exit status is the command's (124 = timeout,
# 125 = VM failed before reporting a status).
#
# Usage:  run-in-rxe-vm.sh [--] COMMAND [ARGS...]
# Env:    RXE_VM_TIMEOUT  seconds before the VM is killed      (default 1800)
#         RXE_VM_MEM      guest MiB                            (default 4096)
#         RXE_VM_SMP      guest vCPUs                          (default nproc)
#         RXE_VM_ACCEL    tcg | kvm     (default tcg: KVM hangs on kvtransfer's CI
#                         host; set kvm explicitly where it works)
#         RXE_VM_NET      dummy | virtio  netdev under rxe0    (default dummy)
#         RXE_VM_RAILS    1 | 2: with 2, a second device rxe1 on dummy1, addresses
#                         10.78.0.1/24 and 10.99.0.1/24 (two RoCE v2 GIDs in two
#                         subnets: routable GID choice)      (default 1)
#         RXE_VM_CACHE    kernel + initramfs cache  (default /var/cache/rxe-vm;
#                         the initramfs is named per script, the kernel is shared)
#         RXE_VM_VERBOSE  1 = show the guest kernel console on stderr
#         RXE_VM_KERNEL_PKG  e.g. linux-image-6.1.0-56-amd64 (default: what
#                         linux-image-amd64 depends on)
# Guest env: RXE_VM=1, RXE_VM_DEV=rxe0, RXE_VM_NETDEV, RXE_VM_IP, RXE_VM_GID_INDEX;
#            with 2 rails also RXE_VM_DEV2=rxe1, RXE_VM_NETDEV2=dummy1, RXE_VM_IP2
set -euo pipefail

[[ $# -gt 0 && $1 == -- ]] && shift
if [[ $# -eq 0 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2
fi
[[ $(id -u) == 0 ]] || { echo "run-in-rxe-vm: must run as root" >&2; exit 125; }

TIMEOUT=${RXE_VM_TIMEOUT:-1800}
MEM=${RXE_VM_MEM:-4096}
SMP=${RXE_VM_SMP:-$(nproc)}
NET=${RXE_VM_NET:-dummy}
RAILS=${RXE_VM_RAILS:-1}
case $RAILS in 1|2) ;; *) echo "run-in-rxe-vm: RXE_VM_RAILS must be 1 or 2" >&2; exit 2;; esac
CACHE=${RXE_VM_CACHE:-/var/cache/rxe-vm}
VERBOSE=${RXE_VM_VERBOSE:-0}
# KVM is not auto-detected on purpose: on the kvtransfer CI host a KVM guest
# hangs during boot even though /dev/kvm exists. TCG is ~5x slower per CPU
# (process start ~40x) but reliable; opt in with RXE_VM_ACCEL=kvm.
RXE_VM_ACCEL=${RXE_VM_ACCEL:-tcg}
case $RXE_VM_ACCEL in tcg|kvm) ;; *) echo "run-in-rxe-vm: RXE_VM_ACCEL must be tcg or kvm" >&2; exit 2;; esac
[[ $RXE_VM_ACCEL != kvm || -w /dev/kvm ]] || { echo "run-in-rxe-vm: RXE_VM_ACCEL=kvm but /dev/kvm is not usable" >&2; exit 125; }
log() { echo "[rxe-vm] $*" >&2; }

# --- 1. host packages (idempotent) -------------------------------------------
PKGS=(qemu-system-x86 busybox-static iproute2 xz-utils ibverbs-providers
      ibverbs-utils rdmacm-utils perftest)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=0
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  command -v apt-get >/dev/null || { log "missing ${missing[*]} and no apt-get to install them"; exit 125; }
  apt-get update -qq && apt_updated=1 || { log "apt-get update failed"; exit 125; }
  DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { log "apt-get install ${missing[*]} failed"; exit 125; }
fi

# --- 2. guest kernel: Debian's linux-image-amd64, unpacked into the cache ------
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"; flock 9          # concurrent runs share the cache
KPKG=${RXE_VM_KERNEL_PKG:-}
[[ -n $KPKG ]] || KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [[ -z $KPKG && $apt_updated == 0 ]]; then
  apt-get update -qq; apt_updated=1
  KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[[ -n $KPKG ]] || { log "cannot resolve linux-image-amd64"; exit 125; }
KVER=${KPKG#linux-image-}
KDIR=$CACHE/$KVER                  # holds boot/vmlinuz-* and lib/modules/$KVER
MODDIR=$KDIR/lib/modules/$KVER
if [[ ! -f $MODDIR/modules.dep ]]; then
  log "fetching kernel $KPKG"
  tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
  (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG") \
    || { rm -rf "$tmp"; log "apt-get download $KPKG failed"; exit 125; }
  rm -rf "$KDIR"; dpkg-deb -x "$tmp"/*.deb "$KDIR"; rm -rf "$tmp"
  rm -rf "$KDIR/usr" "$MODDIR"/kernel/{sound,drivers/{gpu,media,usb,iio,staging,net/wireless}}
  busybox depmod -b "$KDIR" "$KVER"      # the host may lack kmod
fi
VMLINUZ=$KDIR/boot/vmlinuz-$KVER
# TCG spends ~3.5 s in the bzImage's xz decompressor: boot the raw ELF via PVH
if [[ ! -f $KDIR/vmlinux && ! -f $KDIR/vmlinux.none ]]; then
  off=$(LC_ALL=C grep -abo $'\xfd7zXZ' "$VMLINUZ" | head -1 | cut -d: -f1) || true
  rm -f "$KDIR/vmlinux.tmp"
  [[ -n $off ]] && { tail -c +$((off + 1)) "$VMLINUZ" | xz -dc > "$KDIR/vmlinux.tmp"; } 2>/dev/null || true
  if [[ $(head -c4 "$KDIR/vmlinux.tmp" 2>/dev/null) == $'\x7fELF' ]]; then mv "$KDIR/vmlinux.tmp" "$KDIR/vmlinux"
  else rm -f "$KDIR/vmlinux.tmp"; : > "$KDIR/vmlinux.none"; fi
fi
[[ -s $KDIR/vmlinux ]] && VMLINUZ=$KDIR/vmlinux

# --- 3. initramfs: static busybox + the modules needed to mount 9p + /init ------
# own name per version of this script: copies of it (worktrees) share the cache
INITRD=$KDIR/initrd-kvtransfer-$(sha1sum "$0" | cut -c1-12).cpio.gz
if [[ ! -f $INITRD ]]; then
  log "building initramfs"
  declare -A DEP PATHOF DONE
  while IFS=: read -r path deps; do
    DEP[$path]=$deps; n=${path##*/}; PATHOF[${n%.ko}]=$path
  done < "$MODDIR/modules.dep"
  ORDER=()
  visit() { local d; [[ -n ${DONE[$1]:-} ]] && return; DONE[$1]=1
            for d in ${DEP[$1]}; do visit "$d"; done; ORDER+=("$1"); }
  for m in virtio_pci 9pnet_virtio 9p virtio_console; do visit "${PATHOF[$m]}"; done
  ird=$(mktemp -d); mkdir -p "$ird"/{bin,sbin,mods,proc,sys,dev,ctl,lower,rw,newroot,lib/modules}
  cp /bin/busybox "$ird/bin/"; ln -s /bin/busybox "$ird/sbin/modprobe"
  for p in "${ORDER[@]}"; do cp "$MODDIR/$p" "$ird/mods/"; echo "${p##*/}" >> "$ird/mods/order"; done
  cat > "$ird/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m || echo "rxe-vm: insmod $m failed"; done
o=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o $o ctl /ctl || { echo "rxe-vm: no ctl share"; poweroff -f; }
fail() { echo "rxe-vm: $*"; echo "$*" > /ctl/error; sync; poweroff -f; }
. /ctl/conf                                   # KVER MODDIR CWD NET
mount -t 9p -o $o,ro,cache=loose hostroot /lower || fail "mount hostroot"
# modules (incl. request_module() helpers such as crypto-crc32) from the host cache
mkdir -p /lib/modules; ln -s /lower$MODDIR /lib/modules/$KVER
echo /sbin/modprobe > /proc/sys/kernel/modprobe
for m in crc32_generic overlay "dummy numdummies=0" veth rdma_rxe rdma_ucm ib_umad; do modprobe $m || fail "modprobe $m"; done
# root = host / (read-only) + tmpfs overlay
mount -t tmpfs -o mode=755 rw /rw; mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /newroot || fail "overlay"
R=/newroot
mount -t proc proc $R/proc; mount -t sysfs sys $R/sys; mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm; mount -t devpts devpts $R/dev/pts; mount -t tmpfs shm $R/dev/shm
for d in /tmp /run /var/tmp; do mount -t tmpfs -o mode=1777 tmp $R$d; done
mkdir -p $R/run/rxe-vm; mount --bind /ctl $R/run/rxe-vm
mkdir -p $R/lib/modules/$KVER; mount --bind /lower$MODDIR $R/lib/modules/$KVER
if [ "$CWD" != / ]; then mkdir -p "$R$CWD"; mount -t 9p -o $o,cache=mmap cwd "$R$CWD" || fail "mount cwd"; fi
# network + Soft-RoCE
hostname rxe-vm
C="chroot $R"
$C ip link set lo up
if [ "$NET" = virtio ]; then modprobe virtio_net; ND=eth0; IP=10.0.2.15
else ND=dummy0; IP=10.77.0.1; $C ip link add $ND type dummy; fi
$C ip addr add $IP/24 dev $ND; $C ip link set $ND up
$C rdma link add rxe0 type rxe netdev $ND || fail "rdma link add"
# GID index of the RoCE v2 IPv4-mapped GID (filled in asynchronously)
GIDX=; n=0
while [ -z "$GIDX" ] && [ $n -lt 50 ]; do
  for i in 0 1 2 3 4 5 6 7; do
    case $(cat /sys/class/infiniband/rxe0/ports/1/gids/$i) in 0000:0000:0000:0000:0000:ffff:*) GIDX=$i; break;; esac
  done; [ -n "$GIDX" ] || { sleep 0.1; n=$((n+1)); }
done
[ -n "$GIDX" ] || fail "no IPv4 GID on rxe0"
echo "export RXE_VM=1 RXE_VM_DEV=rxe0 RXE_VM_NETDEV=$ND RXE_VM_IP=$IP RXE_VM_GID_INDEX=$GIDX" > /ctl/guestenv
if [ "${RAILS:-1}" = 2 ]; then
  $C ip link add dummy1 type dummy
  $C ip addr add 10.78.0.1/24 dev dummy1; $C ip addr add 10.99.0.1/24 dev dummy1
  $C ip link set dummy1 up
  $C rdma link add rxe1 type rxe netdev dummy1 || fail "rdma link add rxe1"
  n=0; G2=
  while [ -z "$G2" ] && [ $n -lt 50 ]; do
    G2=$(cat /sys/class/infiniband/rxe1/ports/1/gids/* 2>/dev/null | grep -c '0000:0000:0000:0000:0000:ffff:' | grep -v '^[01]$')
    [ -n "$G2" ] || { sleep 0.1; n=$((n+1)); }
  done
  [ -n "$G2" ] || fail "rxe1 has not both IPv4 GIDs"
  echo "export RXE_VM_DEV2=rxe1 RXE_VM_NETDEV2=dummy1 RXE_VM_IP2=10.78.0.1" >> /ctl/guestenv
fi
# output ports -> host stdout/stderr
port() { for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name)" = "$1" ] && echo /dev/${p##*/}; done; }
OUT=$(port out); ERR=$(port err)
cut -d' ' -f1 /proc/uptime > /ctl/t_cmd
$C /bin/bash /run/rxe-vm/cmd.sh </dev/null >$OUT 2>$ERR
echo $? > /ctl/rc
cut -d' ' -f1 /proc/uptime > /ctl/t_end
sync; poweroff -f
EOF
  chmod +x "$ird/init"
  (cd "$ird" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"; rm -rf "$ird"
fi
flock -u 9

# --- 4. per-run control dir: command, environment, status ---------------------
CTL=$(mktemp -d /tmp/rxe-vm.XXXXXX)
QPID=
RELAYS=()
cleanup() {
  [[ -n $QPID ]] && kill "$QPID" 2>/dev/null
  ((${#RELAYS[@]})) && kill "${RELAYS[@]}" 2>/dev/null
  rm -rf "$CTL"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
printf 'KVER=%q\nMODDIR=%q\nCWD=%q\nNET=%q\nRAILS=%q\n' "$KVER" "$MODDIR" "$PWD" "$NET" "$RAILS" > "$CTL/conf"
env -0 > "$CTL/env0"
{
  echo 'while IFS= read -r -d "" kv; do export "$kv" 2>/dev/null; done < /run/rxe-vm/env0'
  echo '. /run/rxe-vm/guestenv'
  echo 'ulimit -l unlimited'
  printf 'cd %q || exit 125\n' "$PWD"
  printf 'exec'; printf ' %q' "$@"; echo
} > "$CTL/cmd.sh"
mkfifo "$CTL"/{out,err,con}.{in,out}   # qemu pipe chardevs; cat relays them
cat "$CTL/out.out" & CAT1=$!
cat "$CTL/err.out" >&2 & CAT2=$!

# --- 5. boot -------------------------------------------------------------------
Q=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -machine pc
   -smp "$SMP" -m "$MEM" -kernel "$VMLINUZ" -initrd "$INITRD")
if [[ $RXE_VM_ACCEL == kvm ]]; then Q+=(-accel kvm -cpu host); else Q+=(-accel tcg,thread=multi -cpu max); fi
if [[ $VERBOSE == 1 ]]; then Q+=(-append "console=ttyS0 panic=-1"); tee "$CTL/console.log" < "$CTL/con.out" >&2 &
else Q+=(-append "console=ttyS0 panic=-1 quiet loglevel=3"); cat "$CTL/con.out" > "$CTL/console.log" & fi
CAT3=$!
Q+=(-chardev pipe,id=con,path="$CTL/con" -serial chardev:con -device virtio-serial-pci
    -chardev pipe,id=out,path="$CTL/out" -device virtserialport,chardev=out,name=out
    -chardev pipe,id=err,path="$CTL/err" -device virtserialport,chardev=err,name=err)
if [[ $NET == virtio ]]; then Q+=(-netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0)
else Q+=(-nic none); fi
share() {  # tag path extra-opts  (qemu escapes ',' as ',,')
  Q+=(-fsdev "local,id=$1,path=${2//,/,,},security_model=none,multidevs=remap$3"
      -device "virtio-9p-pci,fsdev=$1,mount_tag=$1"); }
share hostroot / ,readonly=on
share ctl "$CTL" ""
[[ $PWD != / ]] && share cwd "$PWD" ""
t0=$(date +%s.%N)
timeout -k 10 "$TIMEOUT" "${Q[@]}" </dev/null & QPID=$!
RELAYS=("$CAT1" "$CAT2" "$CAT3")
wait $QPID && qrc=0 || qrc=$?
QPID=
# The relays end at EOF; if qemu died before opening its pipes they block in
# open(2) forever: give them 5 s to drain, then stop them.
relay_alive() { local p; for p in "${RELAYS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
for _ in $(seq 50); do relay_alive || break; sleep 0.1; done
kill "${RELAYS[@]}" 2>/dev/null || true
wait "${RELAYS[@]}" 2>/dev/null || true
RELAYS=()
t1=$(date +%s.%N)

if [[ -f $CTL/rc ]]; then
  rc=$(cat "$CTL/rc")
  awk -v a="$t0" -v b="$t1" -v c="$(cat "$CTL/t_cmd")" -v d="$(cat "$CTL/t_end")" -v rc="$rc" -v acc="$RXE_VM_ACCEL" \
    'BEGIN{printf "[rxe-vm] exit=%s accel=%s vm_wall=%.1fs guest_boot_to_cmd=%.1fs cmd=%.1fs\n", rc, acc, b-a, c, d-c}' >&2
  exit "$rc"
fi
if [[ $qrc == 124 || $qrc == 137 ]]; then log "timed out after ${TIMEOUT}s"; rc=124; else
  log "VM exited (qemu rc=$qrc) without a command status${CTL:+: $(cat "$CTL/error" 2>/dev/null)}"; rc=125; fi
[[ -f $CTL/console.log ]] && { log "guest console (tail):"; tail -n 40 "$CTL/console.log" >&2; }
exit $rc
