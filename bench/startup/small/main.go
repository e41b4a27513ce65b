// Command small is the smallest program using mapguard, for
// BenchmarkStartup: it measures a Guard's Start and Close in itself (see
// package child).
package main

import "github.com/mapguard/mapguard/bench/startup/child"

func main() { child.Main() }
