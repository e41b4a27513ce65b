//go:build linux && amd64

package mapguard_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"golang.org/x/sys/unix"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/testutil"
)

// TestPermission re-runs this test binary as an unprivileged user, with no
// capabilities and with only CAP_BPF+CAP_PERFMON. Without capabilities Start
// must return ErrPermission quickly with nothing left behind. With
// CAP_BPF+CAP_PERFMON the outcome depends on the kernel: perf-event uprobes
// need CAP_SYS_ADMIN since Linux commit ba677dbe, but a uprobe_multi link is
// created through bpf(2) and (measured on 6.18) needs only CAP_BPF and
// CAP_PERFMON. Either the Guard then works for real, or it refuses with
// ErrPermission; nothing in between.
func TestPermission(t *testing.T) {
	if os.Getenv("MAPGUARD_PERMISSION_CHILD") != "" {
		permissionChild(t)
		return
	}
	testutil.RequirePrivileged(t)

	// The go test binary, and t.TempDir, live in directories only root can
	// enter.
	dir, err := os.MkdirTemp("", "mapguard-permission-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "mapguard.test")
	copyFile(t, os.Args[0], bin)

	for _, tc := range []struct {
		name      string
		caps      []uintptr
		mayAttach bool
	}{
		{"no capabilities", nil, false},
		{"CAP_BPF and CAP_PERFMON", []uintptr{unix.CAP_BPF, unix.CAP_PERFMON}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(bin, "-test.run=^TestPermission$", "-test.v")
			cmd.Env = append(os.Environ(), "MAPGUARD_PERMISSION_CHILD=1")
			cmd.Dir = dir
			cmd.SysProcAttr = &syscall.SysProcAttr{
				Credential:  &syscall.Credential{Uid: 65534, Gid: 65534},
				AmbientCaps: tc.caps,
			}
			out, err := cmd.CombinedOutput()
			t.Logf("child output:\n%s", out)
			if err != nil {
				t.Fatalf("child failed: %v", err)
			}
			refused := strings.Contains(string(out), "child: ErrPermission")
			attached := strings.Contains(string(out), "child: attached")
			if !refused && !(tc.mayAttach && attached) {
				t.Fatal("child neither refused with ErrPermission nor (where allowed) attached and worked")
			}
		})
	}
}

func permissionChild(t *testing.T) {
	// The runtime's network poller (an epoll and an eventfd) is created with
	// the first file the process opens and lives on; create it before
	// counting, so that it is not taken for a leak.
	if r, w, err := os.Pipe(); err == nil {
		r.Close()
		w.Close()
	}
	goroutines, fds := runtime.NumGoroutine(), testutil.OpenFDs(t)
	var logs []string
	var mu sync.Mutex
	g, err := mapguard.New(mapguard.Options{Logger: funcr.New(func(prefix, args string) {
		mu.Lock()
		logs = append(logs, args)
		mu.Unlock()
	}, funcr.Options{})})
	if err != nil {
		t.Fatal(err)
	}
	begin := time.Now()
	err = g.Start(context.Background())
	took := time.Since(begin)
	if err == nil {
		// Attached: it must really work.
		events := g.Events()
		goid, line := provoke(misuses[0].run)
		ev := await(t, events, func(ev mapguard.Event) bool { return ev.Goroutine == goid })
		if ev.Site.Line != line {
			t.Fatalf("event %v, want line %d", ev, line)
		}
		// An unprivileged user cannot keep the crash record (the BPF file
		// system is root's): Start says so once, at V(0).
		st := g.Stats()
		// The trap sampler's program loads with these capabilities too.
		if st.Budget == nil || !st.Budget.Sampler {
			t.Fatal("trap sampler not loaded with CAP_BPF and CAP_PERFMON alone")
		}
		mu.Lock()
		said := 0
		for _, l := range logs {
			if strings.Contains(l, "crash record unavailable") {
				said++
			}
		}
		mu.Unlock()
		if st.CrashRecord != "" || st.CrashRecordError == "" || said != 1 {
			t.Fatalf("crash record %q, error %q, logged %d times (want once): %v", st.CrashRecord, st.CrashRecordError, said, logs)
		}
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
		fmt.Println("child: attached and delivered", ev, "; no crash record:", st.CrashRecordError)
		return
	}
	if !errors.Is(err, mapguard.ErrPermission) {
		t.Fatalf("Start = %v, want ErrPermission", err)
	}
	t.Logf("Start failed in %v: %v", took, err)
	waitFor(t, func() bool { return runtime.NumGoroutine() <= goroutines }, "goroutines back to %d", goroutines)
	if n := testutil.OpenFDs(t); n > fds {
		t.Fatalf("%d fds open after a failed Start, %d before", n, fds)
	}
	fmt.Println("child: ErrPermission")
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}
