// chartrender renders a Helm chart's templates with Go's text/template, the engine Helm uses,
// and the handful of Helm/sprig functions the chart needs (include, toYaml, indent, nindent,
// quote, default, required). Helm itself cannot be installed on these machines; this keeps the chart
// honest: every template must parse and render, and scripts/check-manifests.py parses the
// output as YAML.
//
//	chartrender <chart dir> <context.json>   (context: {"Values":..., "Chart":..., "Release":...})
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"
)

func toYaml(v interface{}) string {
	var b strings.Builder
	emit(&b, v, 0)
	return strings.TrimSuffix(b.String(), "\n")
}

func scalar(v interface{}) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return strconv.FormatBool(x)
	case float64:
		if x == float64(int64(x)) {
			return strconv.FormatInt(int64(x), 10)
		}
		return strconv.FormatFloat(x, 'f', -1, 64)
	case string:
		q, _ := json.Marshal(x)
		return string(q)
	}
	return fmt.Sprint(v)
}

func emit(b *strings.Builder, v interface{}, ind int) {
	pad := strings.Repeat(" ", ind)
	switch x := v.(type) {
	case map[string]interface{}:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			switch c := x[k].(type) {
			case map[string]interface{}:
				if len(c) == 0 {
					fmt.Fprintf(b, "%s%s: {}\n", pad, k)
					continue
				}
				fmt.Fprintf(b, "%s%s:\n", pad, k)
				emit(b, c, ind+2)
			case []interface{}:
				if len(c) == 0 {
					fmt.Fprintf(b, "%s%s: []\n", pad, k)
					continue
				}
				fmt.Fprintf(b, "%s%s:\n", pad, k)
				emit(b, c, ind+2)
			default:
				fmt.Fprintf(b, "%s%s: %s\n", pad, k, scalar(c))
			}
		}
	case []interface{}:
		for _, e := range x {
			var sub strings.Builder
			emit(&sub, e, ind+2)
			s := sub.String()
			switch e.(type) {
			case map[string]interface{}, []interface{}:
				fmt.Fprintf(b, "%s- %s", pad, strings.TrimPrefix(s, pad+"  "))
			default:
				fmt.Fprintf(b, "%s- %s\n", pad, scalar(e))
			}
		}
	default:
		fmt.Fprintf(b, "%s%s\n", pad, scalar(v))
	}
}

func indent(n int, s string) string {
	pad := strings.Repeat(" ", n)
	return pad + strings.ReplaceAll(s, "\n", "\n"+pad)
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: chartrender <chart dir> <context.json>")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var ctx map[string]interface{}
	if err := json.Unmarshal(raw, &ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	root := template.New("chart").Option("missingkey=zero")
	funcs := template.FuncMap{
		"toYaml":  toYaml,
		"indent":  indent,
		"nindent": func(n int, s string) string { return "\n" + indent(n, s) },
		"quote":   func(v interface{}) string { return strconv.Quote(fmt.Sprint(v)) },
		"default": func(d interface{}, v interface{}) interface{} {
			if v == nil || v == "" || v == false {
				return d
			}
			return v
		},
		// Helm's required: fail the render with msg when the value is missing or an empty string.
		"required": func(msg string, v interface{}) (interface{}, error) {
			if s, ok := v.(string); v == nil || (ok && s == "") {
				return nil, fmt.Errorf("%s", msg)
			}
			return v, nil
		},
		"include": func(name string, data interface{}) (string, error) {
			var buf bytes.Buffer
			err := root.ExecuteTemplate(&buf, name, data)
			return buf.String(), err
		},
	}
	root.Funcs(funcs)
	files, _ := filepath.Glob(filepath.Join(os.Args[1], "templates", "*"))
	sort.Strings(files)
	var names []string
	for _, f := range files {
		text, err := os.ReadFile(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		name := filepath.Base(f)
		if _, err := root.New(name).Parse(string(text)); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
			os.Exit(1)
		}
		if !strings.HasPrefix(name, "_") {
			names = append(names, name)
		}
	}
	for _, name := range names {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, ctx); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
			os.Exit(1)
		}
		out := strings.ReplaceAll(buf.String(), "<no value>", "")
		fmt.Printf("---\n# Source: %s\n%s\n", name, strings.TrimSpace(out))
	}
}
