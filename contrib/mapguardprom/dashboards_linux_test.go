package mapguardprom

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"

	"github.com/mapguard/mapguard"
	"github.com/mapguard/mapguard/internal/testutil"
)

const dashboardsDir = "../../dashboards"

// dashboardExprs returns every PromQL expression of the Grafana dashboard:
// the panels' targets and the template variables' label_values queries.
func dashboardExprs(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dashboardsDir, "mapguard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
		Templating struct {
			List []struct{ Name, Type, Query string }
		}
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	exprs := map[string]string{}
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for i, tg := range p.Targets {
			exprs["panel "+p.Title+" #"+string(rune('A'+i))] = tg.Expr
		}
	}
	labelValues := regexp.MustCompile(`^label_values\((.*), *\w+\)$`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		m := labelValues.FindStringSubmatch(v.Query)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(selector, label)", v.Name, v.Query)
			continue
		}
		exprs["variable "+v.Name] = m[1]
	}
	return exprs
}

func ruleExprs(t *testing.T) map[string]string {
	t.Helper()
	groups, errs := rulefmt.ParseFile(filepath.Join(dashboardsDir, "mapguard-rules.yaml"), false, model.UTF8Validation, promql, slog.New(slog.DiscardHandler))
	for _, err := range errs {
		t.Error(err)
	}
	exprs := map[string]string{}
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			exprs["rule "+r.Alert+r.Record] = r.Expr
		}
	}
	return exprs
}

// promql is the Prometheus server's own PromQL parser.
var promql = parser.NewParser(parser.Options{})

// grafanaVars replaces Grafana's variables, which are not PromQL, with
// what they stand for at query time.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "${datasource}", "x")

// metricNames parses expr and returns the metric names its selectors name.
func metricNames(t *testing.T, what, expr string) []string {
	t.Helper()
	e, err := promql.ParseExpr(grafanaVars.Replace(expr))
	if err != nil {
		t.Errorf("%s: %q does not parse: %v", what, expr, err)
		return nil
	}
	var names []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		for _, m := range vs.LabelMatchers {
			if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
				name = m.Value
			}
		}
		if name == "" {
			t.Errorf("%s: a selector without a metric name in %q", what, expr)
		}
		names = append(names, name)
		return nil
	})
	if len(names) == 0 {
		t.Errorf("%s: %q names no metric", what, expr)
	}
	return names
}

// TestDashboardsMatchTheCollector parses every expression of the dashboard
// and the alert rules and finds every metric they name in the output of a
// collector over a real Guard with every figure turned on (deep watching
// and operation statistics).
func TestDashboardsMatchTheCollector(t *testing.T) {
	testutil.RequirePrivileged(t)
	g, err := mapguard.New(mapguard.Options{OpStats: true, Detect: append(mapguard.DefaultKinds(), mapguard.MissingKeyDelete)})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(g, Options{}))

	exprs := dashboardExprs(t)
	for k, v := range ruleExprs(t) {
		exprs[k] = v
	}
	used := map[string][]string{} // metric -> expressions naming it
	for what, expr := range exprs {
		for _, name := range metricNames(t, what, expr) {
			used[name] = append(used[name], what)
		}
	}

	// Count map operations until every metric used has a series (the
	// operation counts come from the deep probes, read every tick).
	m := map[int]int{}
	have := map[string]bool{}
	missing := func() (names []string) {
		for name := range used {
			if !have[name] {
				names = append(names, name)
			}
		}
		return names
	}
	for i := 0; i == 0 || len(missing()) > 0 && i < 100; i++ {
		for j := range 1000 {
			m[j%7]++
		}
		time.Sleep(20 * time.Millisecond)
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		clear(have)
		for _, mf := range mfs {
			if len(mf.GetMetric()) > 0 {
				have[mf.GetName()] = true
			}
		}
	}
	for _, name := range missing() {
		t.Errorf("%s, named by %q, is not in the collector's output", name, used[name])
	}
	t.Logf("%d expressions parsed; they name %d metrics, all in the collector's output of %d families", len(exprs), len(used), len(have))
}
