// Command large is a service-sized program for BenchmarkStartup: it
// imports client-go (with every typed informer), the AWS S3 SDK and gRPC
// and uses each enough that the linker keeps them (about 95 MB with Go
// 1.26), then measures a Guard's Start and Close in itself (see package
// child).
package main

import (
	"context"
	"os"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/mapguard/mapguard/bench/startup/child"
)

func main() {
	// Never run for real: the clients are built (so their code is linked)
	// but only called when the environment asks, which the benchmark never does.
	if os.Getenv("MAPGUARD_BENCH_DIAL") != "" {
		ctx := context.Background()
		cs, err := kubernetes.NewForConfig(&rest.Config{Host: os.Getenv("MAPGUARD_BENCH_DIAL")})
		if err == nil {
			cs.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
			cs.AppsV1().Deployments("default").Get(ctx, "x", metav1.GetOptions{})
			// Every typed informer, as controllers link them.
			f := informers.NewSharedInformerFactory(cs, 0)
			f.ForResource(schema.GroupVersionResource{Resource: os.Getenv("MAPGUARD_BENCH_DIAL")})
			f.Start(ctx.Done())
		}
		cl := s3.New(s3.Options{Region: "us-east-1", BaseEndpoint: aws.String("http://" + os.Getenv("MAPGUARD_BENCH_DIAL"))})
		cl.ListBuckets(ctx, &s3.ListBucketsInput{})
		cl.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String("b"), Key: aws.String("k")})
		conn, err := grpc.NewClient(os.Getenv("MAPGUARD_BENCH_DIAL"), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err == nil {
			healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
			s := grpc.NewServer()
			healthpb.RegisterHealthServer(s, nil)
			s.Stop()
		}
	}
	child.Main()
}
