//go:build linux && amd64

package mapguard

import "github.com/mapguard/mapguard/internal/uprobe"

// HoldNestedScan holds the search for nested reads of Guards started from
// now on until release is called (see uprobe.HoldNestedScan).
var HoldNestedScan = uprobe.HoldNestedScan
