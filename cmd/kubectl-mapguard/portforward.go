package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
)

// target is what a TARGET argument names.
type target struct {
	resource string // "pod" or "deployment"
	name     string
}

// parseTarget reads pod/NAME, po/NAME, pods/NAME, deploy/NAME,
// deployment/NAME, deployments/NAME, or a bare NAME (a pod).
func parseTarget(s string) (target, error) {
	res, name, ok := strings.Cut(s, "/")
	if !ok {
		res, name = "pod", s
	}
	switch res {
	case "pod", "pods", "po":
		res = "pod"
	case "deploy", "deployment", "deployments":
		res = "deployment"
	default:
		return target{}, fmt.Errorf("target %q: want pod/NAME or deploy/NAME", s)
	}
	if name == "" || strings.Contains(name, "/") {
		return target{}, fmt.Errorf("target %q: want pod/NAME or deploy/NAME", s)
	}
	return target{res, name}, nil
}

// resolvePod returns the pod to forward to: the named pod, or a running
// pod of the deployment (the first by name, as kubectl port-forward picks
// one).
func resolvePod(ctx context.Context, cs kubernetes.Interface, ns string, t target) (string, error) {
	if t.resource == "pod" {
		pod, err := cs.CoreV1().Pods(ns).Get(ctx, t.name, metav1.GetOptions{})
		if err != nil {
			return "", fmt.Errorf("get pod %s/%s: %w", ns, t.name, err)
		}
		if pod.Status.Phase != corev1.PodRunning {
			return "", fmt.Errorf("pod %s/%s is %s, not Running", ns, t.name, pod.Status.Phase)
		}
		return pod.Name, nil
	}
	d, err := cs.AppsV1().Deployments(ns).Get(ctx, t.name, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("get deployment %s/%s: %w", ns, t.name, err)
	}
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil {
		return "", fmt.Errorf("deployment %s/%s: selector: %w", ns, t.name, err)
	}
	pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: sel.String()})
	if err != nil {
		return "", fmt.Errorf("list pods of deployment %s/%s: %w", ns, t.name, err)
	}
	best := ""
	for _, p := range pods.Items {
		if p.Status.Phase == corev1.PodRunning && p.DeletionTimestamp == nil && (best == "" || p.Name < best) {
			best = p.Name
		}
	}
	if best == "" {
		return "", fmt.Errorf("deployment %s/%s has no running pod", ns, t.name)
	}
	return best, nil
}

// forward is a running port-forward to a pod.
type forward struct {
	stop  chan struct{}
	local string
}

func (f *forward) Address() string { return f.local }
func (f *forward) Close()          { close(f.stop) }

// kubeClient loads the kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config,
// or the in-cluster config) and returns the REST config and the namespace
// to use.
func kubeClient(c *config) (*rest.Config, string, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = c.kubeconfig
	overrides := &clientcmd.ConfigOverrides{CurrentContext: c.context}
	if c.namespace != "" {
		overrides.Context.Namespace = c.namespace
	}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides)
	rc, err := cc.ClientConfig()
	if err != nil {
		return nil, "", fmt.Errorf("load kubeconfig: %w", err)
	}
	ns, _, err := cc.Namespace()
	if err != nil {
		return nil, "", fmt.Errorf("load kubeconfig: %w", err)
	}
	return rc, ns, nil
}

// portForward forwards a loopback port to c.port of the target's pod, as
// kubectl port-forward does (SPDY through the API server's portforward
// subresource).
func portForward(ctx context.Context, c *config, stderr io.Writer) (*forward, error) {
	t, err := parseTarget(c.target)
	if err != nil {
		return nil, err
	}
	rc, ns, err := kubeClient(c)
	if err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	pod, err := resolvePod(ctx, cs, ns, t)
	if err != nil {
		return nil, err
	}
	transport, upgrader, err := spdy.RoundTripperFor(rc)
	if err != nil {
		return nil, fmt.Errorf("port-forward transport: %w", err)
	}
	u := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("portforward").URL()
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: transport}, http.MethodPost, u)
	stop, ready := make(chan struct{}), make(chan struct{})
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{"0:" + strconv.Itoa(c.port)}, stop, ready, io.Discard, stderr)
	if err != nil {
		return nil, fmt.Errorf("port-forward to pod %s/%s: %w", ns, pod, err)
	}
	errc := make(chan error, 1)
	go func() { errc <- fw.ForwardPorts() }()
	select {
	case <-ready:
	case err := <-errc:
		return nil, fmt.Errorf("port-forward to pod %s/%s port %d: %w", ns, pod, c.port, err)
	case <-ctx.Done():
		close(stop)
		return nil, ctx.Err()
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) == 0 {
		close(stop)
		return nil, fmt.Errorf("port-forward to pod %s/%s: no local port: %v", ns, pod, err)
	}
	return &forward{stop: stop, local: "127.0.0.1:" + strconv.Itoa(int(ports[0].Local))}, nil
}
