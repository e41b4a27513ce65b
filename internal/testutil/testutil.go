// Package testutil holds helpers shared by mapguard's tests.
package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// RequirePrivileged skips t unless the process is root on linux/amd64. With
// MAPGUARD_REQUIRE_PRIVILEGED=1 (as CI sets it) it fails instead: there,
// the real-kernel tests must run.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	reason := ""
	switch {
	case runtime.GOOS != "linux" || runtime.GOARCH != "amd64":
		reason = "needs linux/amd64"
	case os.Geteuid() != 0:
		reason = "needs root (CAP_SYS_ADMIN) to attach uprobes"
	}
	if reason == "" {
		return
	}
	if os.Getenv("MAPGUARD_REQUIRE_PRIVILEGED") == "1" {
		t.Fatalf("%s, and MAPGUARD_REQUIRE_PRIVILEGED=1", reason)
	}
	t.Skip(reason)
}

// OpenFDs counts this process's open file descriptors.
func OpenFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// ModuleRoot returns the directory holding go.mod.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(string(out[:len(out)-1]))
}
