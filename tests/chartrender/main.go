// chartrender renders a Helm chart's templates with Go's text/template, the engine Helm uses,
// and the handful of Helm/sprig functions the chart needs (include, toYaml, indent, nindent,
// quote, default, required, fail, dict, list, hasKey, kindIs, empty, toString, int64, trunc,
// trimSuffix, contains, replace, b64enc), each with sprig's semantics for the values a chart
// sees. Helm itself cannot be installed on these machines; this keeps the chart
// honest: every template must parse and render, and scripts/check-manifests.py parses the
// output as YAML.
//
//	chartrender <chart dir> <context.json>   (context: {"Values":..., "Chart":..., "Release":...})
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
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

// empty is sprig's notion: nil, false, 0, "" and empty maps and lists are empty.
func empty(v interface{}) bool {
	if v == nil {
		return true
	}
	r := reflect.ValueOf(v)
	switch r.Kind() {
	case reflect.Bool:
		return !r.Bool()
	case reflect.String, reflect.Map, reflect.Slice, reflect.Array:
		return r.Len() == 0
	case reflect.Float32, reflect.Float64:
		return r.Float() == 0
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return r.Int() == 0
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return r.Uint() == 0
	}
	return false
}

// toString as sprig's: a string as is, anything else as fmt's %v prints it (so a large number
// from a values file, a float64 as in Helm, prints with an exponent: use int64 for numbers).
func toString(v interface{}) string {
	if s, ok := v.(string); ok {
		return s
	}
	return fmt.Sprintf("%v", v)
}

func toInt64(v interface{}) int64 {
	switch x := v.(type) {
	case float64:
		return int64(x)
	case int:
		return int64(x)
	case int64:
		return x
	case bool:
		if x {
			return 1
		}
		return 0
	case string:
		if n, err := strconv.ParseInt(strings.TrimSpace(x), 10, 64); err == nil {
			return n
		}
		if f, err := strconv.ParseFloat(strings.TrimSpace(x), 64); err == nil {
			return int64(f)
		}
	}
	return 0
}

func kindOf(v interface{}) string {
	if v == nil {
		return "invalid"
	}
	return reflect.ValueOf(v).Kind().String()
}

func trunc(n int, s string) string {
	switch {
	case n >= 0 && len(s) > n:
		return s[:n]
	case n < 0 && len(s) > -n:
		return s[len(s)+n:]
	}
	return s
}

func dict(kv ...interface{}) map[string]interface{} {
	m := map[string]interface{}{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[toString(kv[i])] = kv[i+1]
	}
	return m
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
			if empty(v) {
				return d
			}
			return v
		},
		"empty":      empty,
		"toString":   toString,
		"int64":      toInt64,
		"kindIs":     func(k string, v interface{}) bool { return kindOf(v) == k },
		"hasKey":     func(m map[string]interface{}, k string) bool { _, ok := m[k]; return ok },
		"dict":       dict,
		"list":       func(v ...interface{}) []interface{} { return v },
		"trunc":      trunc,
		"trimSuffix": func(suf, s string) string { return strings.TrimSuffix(s, suf) },
		"contains":   func(sub, s string) bool { return strings.Contains(s, sub) },
		"replace":    func(old, new, s string) string { return strings.ReplaceAll(s, old, new) },
		"b64enc":     func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) },
		// Helm's fail: stop the render with msg.
		"fail": func(msg string) (string, error) { return "", fmt.Errorf("%s", msg) },
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
