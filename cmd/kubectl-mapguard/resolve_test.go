package main

import (
	"context"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func pod(name string, phase corev1.PodPhase, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", Labels: labels}, Status: corev1.PodStatus{Phase: phase}}
}

func TestResolvePod(t *testing.T) {
	web := map[string]string{"app": "web"}
	cs := fake.NewClientset(
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"},
			Spec: appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: web}}},
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: "idle", Namespace: "shop"},
			Spec: appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "idle"}}}},
		pod("web-c", corev1.PodRunning, web),
		pod("web-a", corev1.PodPending, web),
		pod("web-b", corev1.PodRunning, web),
		pod("other", corev1.PodRunning, map[string]string{"app": "other"}),
		pod("idle-0", corev1.PodFailed, map[string]string{"app": "idle"}),
	)
	ctx := context.Background()
	for _, c := range []struct {
		t       target
		want    string
		wantErr bool
	}{
		{target{"deployment", "web"}, "web-b", false}, // running, first by name
		{target{"pod", "web-c"}, "web-c", false},
		{target{"pod", "web-a"}, "", true}, // pending
		{target{"pod", "nope"}, "", true},
		{target{"deployment", "idle"}, "", true}, // no running pod
		{target{"deployment", "nope"}, "", true},
	} {
		got, err := resolvePod(ctx, cs, "shop", c.t)
		if (err != nil) != c.wantErr || got != c.want {
			t.Errorf("%+v: %q, %v; want %q (error %v)", c.t, got, err, c.want, c.wantErr)
		}
	}
}
