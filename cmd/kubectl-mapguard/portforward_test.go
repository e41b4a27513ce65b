package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	spdystream "k8s.io/apimachinery/pkg/util/httpstream/spdy"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/debughttp"
)

// fakeAPIServer plays the part of the Kubernetes API server and kubelet
// for one pod: it answers GET of the pod (Running) and its portforward
// subresource with the SPDY protocol kubectl port-forward speaks, and
// connects each forwarded stream to 127.0.0.1 at the requested port (the
// "pod" is this process). Everything else is 404.
func fakeAPIServer(t *testing.T, ns, name string) *httptest.Server {
	podPath := "/api/v1/namespaces/" + ns + "/pods/" + name
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodGet && r.URL.Path == podPath:
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(&corev1.Pod{
				TypeMeta:   metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
				Status:     corev1.PodStatus{Phase: corev1.PodRunning},
			})
		case r.Method == http.MethodPost && r.URL.Path == podPath+"/portforward":
			servePortForward(t, w, r)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func servePortForward(t *testing.T, w http.ResponseWriter, r *http.Request) {
	if _, err := httpstream.Handshake(r, w, []string{"portforward.k8s.io"}); err != nil {
		return
	}
	streams := make(chan httpstream.Stream, 8)
	conn := spdystream.NewResponseUpgrader().UpgradeResponse(w, r, func(s httpstream.Stream, _ <-chan struct{}) error {
		streams <- s
		return nil
	})
	if conn == nil {
		return
	}
	defer conn.Close()
	for {
		select {
		case s := <-streams:
			if s.Headers().Get("streamType") != "data" {
				continue // the error stream: nothing to report
			}
			go func() {
				defer s.Close()
				c, err := net.Dial("tcp", "127.0.0.1:"+s.Headers().Get("port"))
				if err != nil {
					t.Errorf("fake kubelet: %v", err)
					return
				}
				defer c.Close()
				go io.Copy(c, s)
				io.Copy(s, c)
			}()
		case <-conn.CloseChan():
			return
		}
	}
}

func writeKubeconfig(t *testing.T, server, ns string) string {
	t.Helper()
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: %s
contexts:
- name: fake
  context:
    cluster: fake
    user: nobody
    namespace: %s
users:
- name: nobody
  user:
    token: not-checked
current-context: fake
`, server, ns)
	p := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// serveFakeGuard runs a Guard on the fake probe with the debug handler on a
// loopback port, and returns the port.
func serveFakeGuard(t *testing.T) (port string, fake *mapguard.Fake, g *mapguard.Guard) {
	t.Helper()
	fake = mapguard.NewFake()
	g, err := mapguard.New(mapguard.Options{Probe: fake})
	if err != nil {
		t.Fatal(err)
	}
	h := debughttp.New(g, debughttp.Options{ReadCrashReports: func() ([]mapguard.Event, error) { return nil, nil }})
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/debug/mapguard/", h)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() { h.Close(); srv.Close(); g.Close() })
	_, port, _ = net.SplitHostPort(strings.TrimPrefix(srv.URL, "http://"))
	return port, fake, g
}

// The port-forward path end to end without a cluster: client-go loads the
// kubeconfig, gets the pod, and forwards over SPDY through a fake API
// server to the service's debug port.
func TestPortForwardThroughFakeAPIServer(t *testing.T) {
	port, fake, g := serveFakeGuard(t)
	seen := make(chan struct{}, 1)
	g.OnEvent(func(mapguard.Event) { seen <- struct{}{} })
	fake.Emit(mapguard.Event{Kind: mapguard.NilMapWrite, Site: mapguard.Frame{Function: "main.h", File: "/src/main.go", Line: 9}})
	<-seen

	api := fakeAPIServer(t, "shop", "web-0")
	kc := writeKubeconfig(t, api.URL, "shop")
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"stats", "pod/web-0", "--kubeconfig", kc, "--port", port, "-o", "json"}, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	var st debughttp.Stats
	if err := json.Unmarshal(out.Bytes(), &st); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	if st.Events["nil-map-write"] != 1 {
		t.Errorf("stats through the port-forward: %+v", st)
	}
}

func TestPortForwardErrors(t *testing.T) {
	api := fakeAPIServer(t, "shop", "web-0")
	kc := writeKubeconfig(t, api.URL, "shop")
	closed := httptest.NewServer(http.NotFoundHandler())
	closed.Close()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"stats", "pod/web-1", "--kubeconfig", kc}, "get pod shop/web-1"},
		{[]string{"stats", "pod/web-0", "-n", "other", "--kubeconfig", kc}, "get pod other/web-0"},
		{[]string{"stats", "svc/web", "--kubeconfig", kc}, "want pod/NAME or deploy/NAME"},
		{[]string{"stats", "pod/web-0", "--kubeconfig", filepath.Join(t.TempDir(), "none")}, "load kubeconfig"},
		{[]string{"stats", "pod/web-0", "--kubeconfig", writeKubeconfig(t, closed.URL, "shop")}, "connection refused"},
	} {
		var out, errOut bytes.Buffer
		if code := run(context.Background(), c.args, &out, &errOut); code == 0 || !strings.Contains(errOut.String(), c.want) {
			t.Errorf("%q: exit %d, %q; want an error containing %q", c.args, code, errOut.String(), c.want)
		}
	}
}
