//go:build linux

package main

// A suite is an open-source module whose own tests the corpus runs. Versions
// are pinned: labels name file:line in these versions.
type suite struct {
	Name    string // short name for flags and tables
	Module  string // module path
	Version string
	Why     string
}

var suites = []suite{
	{"lru", "github.com/hashicorp/golang-lru/v2", "v2.0.7",
		"LRU and ARC/2Q caches: a map from key to list element on every Get/Add, misses by design"},
	{"gocache", "github.com/patrickmn/go-cache", "v2.1.0+incompatible",
		"TTL cache: one map[string]Item under an RWMutex, comma-ok lookups, janitor deletes, sharded variant"},
	{"httprouter", "github.com/julienschmidt/httprouter", "v1.3.0",
		"HTTP router: per-method tree lookups (root := r.trees[method]; if root != nil), the idiom the issue names"},
	{"toml", "github.com/BurntSushi/toml", "v1.6.0",
		"config decoder: maps decoded through reflect, key sets (map[string]bool) for implicit and defined tables"},
	{"gjson", "github.com/tidwall/gjson", "v1.18.0",
		"JSON path library: modifiers looked up by name in a map, result maps built from JSON objects"},
	{"metrics", "github.com/rcrowley/go-metrics", "v0.0.0-20250401214520-65e299d6c5c9",
		"metrics registry: map[string]interface{} of metrics under a mutex, GetOrRegister on every update"},
}
