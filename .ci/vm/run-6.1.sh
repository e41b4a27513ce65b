#!/usr/bin/env bash
# Runs mapguard's privileged tests inside a QEMU VM booted on Debian
# bookworm's 6.1 LTS kernel. 6.1 has no uprobe_multi links (added in 6.6), so
# this proves the perf-event uprobe fallback attaches, delivers and detaches
# on a real kernel. See .ci/vm/README.md.
#
# Runs as root on Debian bookworm. Everything it fetches comes from Debian's
# mirrors through apt; its work files live under $MAPGUARD_VM_DIR
# (default /tmp/mapguard-vm), never in the repository. Exits 0 only if the VM
# printed "VM-RESULT: PASS" and no test skipped unexpectedly.
#
# Environment:
#   MAPGUARD_VM_DIR        work directory (default /tmp/mapguard-vm)
#   MAPGUARD_VM_KERNEL_PKG kernel package (default: what linux-image-cloud-amd64 depends on)
#   MAPGUARD_VM_TIMEOUT    hard limit on the VM run in seconds (default 900)
#   MAPGUARD_VM_ACCEL      kvm, tcg or auto (default auto: hardware KVM if any, else TCG)
#   MAPGUARD_VM_SKIP       extra -test.skip pattern for every test binary (default none)
#   MAPGUARD_VM_REFRESH    set to re-resolve linux-image-cloud-amd64 instead of reusing the cached kernel
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH=/usr/local/go/bin:$PATH
export GOFLAGS=-mod=readonly

VMDIR=${MAPGUARD_VM_DIR:-/tmp/mapguard-vm}
VM_TIMEOUT=${MAPGUARD_VM_TIMEOUT:-900}
# Inside the VM, per test binary (go test's -timeout).
TEST_TIMEOUT=480s
# Tests that cannot run in the VM, as a -test.skip pattern for the root
# package. Each one is listed with its reason in .ci/vm/README.md.
#   TestBuildMatrix: builds programs with `go build` (Go toolchain, module
#   proxy and source tree; it also skips under -short anyway).
#   TestCrashRecordTimeNamespace: needs util-linux `unshare --time`; the VM
#   has busybox's unshare, which has no time namespaces.
#   TestNextGo: builds with the newest Go toolchain, like TestBuildMatrix.
#   TestRealMapGrowthDefault: grows a map to 2M entries (skips in -short).
#   TestPairedChild: the child process of the paired benchmarks (skips
#   unless a benchmark starts it).
ROOT_SKIP='^TestBuildMatrix$|^TestCrashRecordTimeNamespace$|^TestNextGo$|^TestRealMapGrowthDefault$|^TestPairedChild$'
EXTRA_SKIP=${MAPGUARD_VM_SKIP:-}
# Skips the log may contain: on 6.1, TestMultiLinks must skip (no
# uprobe_multi: the fallback is what ran), and so must
# TestCrashRecordBPFCapabilities (with only CAP_BPF and CAP_PERFMON, Start
# refuses: perf-event uprobes need CAP_SYS_ADMIN). Any other skip fails the
# run.
EXPECTED_SKIPS='TestMultiLinks|TestCrashRecordBPFCapabilities'
# Skips allowed, not required: TestRealNestedAtStart skips if the search
# for nested reads was not done within Start (it is, in the VM, so far);
# TestRealQuietSiteStaysExact skips where a hit at its quiet site costs
# over 50 us (under TCG: 154 us), since 10 reads a second are then no
# quiet site.
ALLOWED_SKIPS='TestRealNestedAtStart|TestRealQuietSiteStaysExact'
# Under TCG a test's timing is 10-50x the host's, and a timing-dependent
# test fails now and then on its own (2026-11-28: both runs of one CI
# failed, on four different tests: a bloat event and 44 of 200 deletes
# not seen within their timeouts, and two crash-record tests). Each failed
# test is run again, alone, up to RERUNS times; the log keeps every
# failure, each rerun marked VM-RERUN, so that they are read.
RERUNS=2

begin=$SECONDS
step() { printf '\n=== [%ds] %s\n' $((SECONDS - begin)) "$*"; }

if [ "$(id -u)" != 0 ]; then
	echo "run-6.1.sh: must run as root (installs packages, uses /dev/kvm)" >&2
	exit 1
fi
mkdir -p "$VMDIR/kernel" "$VMDIR/debs"

step "packages: qemu-system-x86, busybox-static, cpio"
apt_updated=
apt_update() {
	if [ -z "$apt_updated" ]; then
		apt-get update -qq
		apt_updated=1
	fi
}
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
if [ ${#missing[@]} -gt 0 ]; then
	apt_update
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$VMDIR/apt.log" 2>&1 ||
		{ cat "$VMDIR/apt.log"; exit 1; }
fi
qemu-system-x86_64 --version | head -1

step "kernel: Debian bookworm 6.1 (downloaded and unpacked, not installed)"
# The image package is unpacked into $VMDIR rather than installed: installing
# it would run initramfs-tools and the bootloader hooks on this machine for
# nothing. QEMU boots the vmlinuz directly with our own initramfs; the
# uprobe, BPF and tracing code the tests need is built in (checked below).
kpkg=${MAPGUARD_VM_KERNEL_PKG:-}
if [ -z "$kpkg" ] && [ -s "$VMDIR/kernel/package" ] && [ -z "${MAPGUARD_VM_REFRESH:-}" ]; then
	kpkg=$(cat "$VMDIR/kernel/package")
fi
if [ -z "$kpkg" ]; then
	apt_update
	kpkg=$(apt-cache depends --important linux-image-cloud-amd64 | awk '$1 == "Depends:" { print $2; exit }')
	[ -n "$kpkg" ] || { echo "cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
fi
kdir=$VMDIR/kernel/$kpkg
if [ ! -s "$kdir/vmlinuz" ]; then
	apt_update
	rm -rf "$kdir" "$VMDIR/debs"/*
	# _apt cannot write into a root-only directory; let it.
	chmod 0777 "$VMDIR/debs"
	(cd "$VMDIR/debs" && apt-get download -qq "$kpkg")
	deb=$(ls "$VMDIR/debs/${kpkg}"_*.deb)
	mkdir -p "$kdir/x"
	dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kdir/x" --wildcards './boot/vmlinuz-*' './boot/config-*'
	mv "$kdir"/x/boot/vmlinuz-* "$kdir/vmlinuz"
	mv "$kdir"/x/boot/config-* "$kdir/config"
	dpkg-deb -f "$deb" Version >"$kdir/version"
	rm -rf "$kdir/x" "$deb"
	echo "$kpkg" >"$VMDIR/kernel/package"
fi
echo "$kpkg $(cat "$kdir/version")"
for opt in UPROBES UPROBE_EVENTS BPF_SYSCALL BPF_EVENTS PERF_EVENTS DEBUG_FS TRACING \
	DEVTMPFS TMPFS BLK_DEV_INITRD SERIAL_8250_CONSOLE; do
	grep -qx "CONFIG_$opt=y" "$kdir/config" || { echo "kernel config lacks CONFIG_$opt=y" >&2; exit 1; }
done
echo "config: UPROBES UPROBE_EVENTS BPF_SYSCALL BPF_EVENTS PERF_EVENTS ... built in"

step "test binaries (static, host Go)"
go version
bindir=$VMDIR/root/tests
rm -rf "$VMDIR/root"
mkdir -p "$bindir"
# name:package; the root package's binary is mapguard.test, as go test names it.
packages="mapguard:. uprobe:./internal/uprobe wire:./internal/wire rt:./internal/rt"
for np in $packages; do
	CGO_ENABLED=0 go test -c -o "$bindir/${np%%:*}.test" "${np#*:}"
done
ls "$bindir"

step "initramfs"
root=$VMDIR/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,root,etc}
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
cat >"$root/init" <<EOF
#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin HOME=/root TMPDIR=/tmp
# Privileged tests fail instead of skipping.
export MAPGUARD_REQUIRE_PRIVILEGED=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
# A newline first: the console line may start with the firmware's escapes.
echo
echo "VM-KERNEL: \$(uname -r) \$(cat /proc/version)"
echo "VM-SYSCTL: perf_event_paranoid=\$(cat /proc/sys/kernel/perf_event_paranoid) unprivileged_bpf_disabled=\$(cat /proc/sys/kernel/unprivileged_bpf_disabled) nproc=\$(nproc)"
result=PASS
cd /tmp
for name in mapguard uprobe wire rt; do
	skip='${EXTRA_SKIP:-^\$}'
	[ \$name = mapguard ] && skip='$ROOT_SKIP${EXTRA_SKIP:+|$EXTRA_SKIP}'
	echo "VM-RUN: \$name.test"
	{ /tests/\$name.test -test.v -test.short -test.count=1 -test.timeout=$TEST_TIMEOUT -test.skip="\$skip"; echo \$? >/tmp/rc; } 2>&1 | tee /tmp/out
	rc=\$(cat /tmp/rc)
	echo "VM-EXIT: \$name.test rc=\$rc"
	# A test that failed is run again, alone, up to $RERUNS times (see
	# the comment on RERUNS): it passes only if a rerun passes. A binary
	# that failed without a failed test (a panic, a timeout) is not rerun.
	failed=\$(grep -aE '^--- FAIL: ' /tmp/out | sed -E 's/^--- FAIL: ([^ ]+).*/\\1/' | sort -u | tr '\\n' '|' | sed 's/|\$//')
	try=0
	while [ \$rc != 0 ] && [ -n "\$failed" ] && [ \$try -lt $RERUNS ] && ! grep -aqE '^(panic: |fatal error: )' /tmp/out; do
		try=\$((try + 1))
		echo "VM-RERUN: \$name.test try \$try: \$failed"
		{ /tests/\$name.test -test.v -test.short -test.count=1 -test.timeout=$TEST_TIMEOUT -test.skip="\$skip" -test.run="^(\$failed)\$"; echo \$? >/tmp/rc; } 2>&1 | tee /tmp/out
		rc=\$(cat /tmp/rc)
		echo "VM-EXIT: \$name.test rerun \$try rc=\$rc"
		failed=\$(grep -aE '^--- FAIL: ' /tmp/out | sed -E 's/^--- FAIL: ([^ ]+).*/\\1/' | sort -u | tr '\\n' '|' | sed 's/|\$//')
	done
	[ \$rc = 0 ] || result=FAIL
done
echo
echo "VM-RESULT: \$result"
sync
poweroff -f
EOF
chmod 0755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$VMDIR/initramfs.cpio"
du -h "$VMDIR/initramfs.cpio" | cut -f1

step "boot $kpkg"
# KVM only where it is hardware KVM (kvm_intel or kvm_amd). Some nested
# hosts expose /dev/kvm through another backend: on Firecracker hosts with
# kvm_pvm an unmodified 6.1 kernel takes minutes to decompress, then dies
# with "KVM internal error ... emulation failure" on its int3 self-test (and
# on cmpxchg16b, xrstor). Uprobes are int3s, so such a VM proves nothing;
# there we use TCG. MAPGUARD_VM_ACCEL=kvm|tcg overrides the choice.
kvm_usable() {
	[ -c /dev/kvm ] && [ -w /dev/kvm ] || return 1
	[ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ] || return 1
	echo quit | qemu-system-x86_64 -accel kvm -machine none -nodefaults -no-user-config \
		-display none -monitor stdio >/dev/null 2>&1
}
accel=${MAPGUARD_VM_ACCEL:-auto}
if [ "$accel" = auto ]; then
	if kvm_usable; then
		accel=kvm
	else
		backend=$(ls -d /sys/module/kvm_* 2>/dev/null | xargs -rn1 basename | tr '\n' ' ')
		echo "WARNING: no hardware KVM here (/dev/kvm: $([ -c /dev/kvm ] && echo present || echo absent); modules: ${backend:-none});" \
			"using TCG emulation (slower)" >&2
		accel=tcg
	fi
fi
log=$VMDIR/console.log

# run_vm ACCEL: boots the VM, streams its console to stdout and $log, and
# sets qemu_rc. Under KVM, gives up early (qemu_rc=99) if KVM reports an
# internal error or the kernel has not reached /init in 120 s.
run_vm() {
	local cpu=(-cpu max) kvm_boot_limit=120
	[ "$1" = kvm ] && cpu=(-cpu host)
	# Single-threaded TCG: both vCPUs on one host thread, in turn. Under
	# multi-threaded TCG (QEMU 7.2, Debian bookworm's) the test processes
	# died now and then of what real x86 cannot do: an instruction run
	# out of line in the uprobes' XOL page by one vCPU was, on the other
	# vCPU, a stale translation of what that slot held before (a 7-byte
	# LEA of another site run in place of a 4-byte CMP, skipping the next
	# JBE and PUSH: a stack one slot short). See .ci/vm/README.md.
	[ "$1" = tcg ] && set -- "tcg,thread=single"
	: >"$log"
	timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 -accel "$1" "${cpu[@]}" \
		-machine q35 -m 2G -smp 2 -nographic -nic none -no-reboot -no-user-config \
		-kernel "$kdir/vmlinuz" -initrd "$VMDIR/initramfs.cpio" \
		-append "console=ttyS0 panic=-1 quiet" </dev/null >>"$log" 2>&1 &
	local qpid=$! started=$SECONDS
	tail -n +1 --pid=$qpid -f "$log" &
	local tpid=$!
	qemu_rc=
	while kill -0 $qpid 2>/dev/null; do
		if [ "${1%%,*}" = kvm ] && { grep -aq 'KVM internal error' "$log" ||
			{ ((SECONDS - started > kvm_boot_limit)) && ! grep -aq 'VM-KERNEL:' "$log"; }; }; then
			printf "\nWARNING: the VM failed under KVM; retrying with TCG\n" >&2
			kill $qpid 2>/dev/null || true
			qemu_rc=99
			break
		fi
		sleep 1
	done
	local rc=0
	wait $qpid || rc=$?
	wait $tpid 2>/dev/null || true
	qemu_rc=${qemu_rc:-$rc}
}
echo "accelerator: $accel"
run_vm "$accel"
if [ "$qemu_rc" = 99 ]; then
	cp "$log" "$log.kvm-failed"
	accel=tcg
	run_vm tcg
fi
tr -d '\r' <"$log" >"$log.txt"

step "summary"
echo "accelerator: $accel"
grep -aoE 'VM-(KERNEL|SYSCTL|EXIT): .*' "$log.txt" || true
grep -aE '^ *--- (PASS|FAIL|SKIP)' "$log.txt" | sed 's/ ([0-9.]*s)$//' || true
status=0
if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
	echo "VM timed out after ${VM_TIMEOUT}s"
	status=1
elif [ "$qemu_rc" != 0 ]; then
	echo "qemu exited with $qemu_rc"
	status=1
fi
if ! grep -aqx 'VM-RESULT: PASS' "$log.txt"; then
	echo "VM did not report VM-RESULT: PASS"
	status=1
fi
unexpected=$(grep -aE '^ *--- SKIP' "$log.txt" | grep -vE -- "--- SKIP: ($EXPECTED_SKIPS|$ALLOWED_SKIPS) " || true)
if [ -n "$unexpected" ]; then
	printf 'unexpected skips:\n%s\n' "$unexpected"
	status=1
fi
for t in ${EXPECTED_SKIPS//|/ }; do
	if ! grep -aqE -- "--- SKIP: $t " "$log.txt"; then
		echo "$t did not skip: uprobe_multi was used on this kernel, so the fallback was not what ran"
		status=1
	fi
done
echo "console log: $log"
echo "took $((SECONDS - begin))s"
if [ $status = 0 ]; then echo "run-6.1.sh: PASS"; else echo "run-6.1.sh: FAIL"; fi
exit $status
