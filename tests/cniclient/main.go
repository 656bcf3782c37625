// cniclient drives a CNI conflist through libcni, the library container runtimes use, so
// tests call aws-cni (and the plugins chained after it) exactly as containerd or CRI-O would.
//
// Usage: cniclient add|check|del CONFLIST BINDIR CACHEDIR CONTAINERID NETNS IFNAME PODNS PODNAME [PORTMAPPINGS_JSON]
//
//	cniclient serve CONFLIST BINDIR CACHEDIR
//
// serve is a long-running runtime, as containerd is: one JSON request per stdin line
// ({"id","cmd","cid","netns","ifname","podns","pod"}), each handled at once on its own
// goroutine, one JSON reply per line ({"id","ok","err","ms"}: the libcni call's own time). The
// benchmark uses it so that exec'ing a Go client per call is not part of what it times.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
)

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	os.Exit(1)
}

type request struct {
	ID     int    `json:"id"`
	Cmd    string `json:"cmd"`
	Cid    string `json:"cid"`
	NetNS  string `json:"netns"`
	IfName string `json:"ifname"`
	PodNs  string `json:"podns"`
	Pod    string `json:"pod"`
}

type reply struct {
	ID  int     `json:"id"`
	OK  bool    `json:"ok"`
	Err string  `json:"err,omitempty"`
	Ms  float64 `json:"ms"`
}

func serve(confPath, binDir, cacheDir string) {
	list, err := libcni.ConfListFromFile(confPath)
	if err != nil {
		fail("load %s: %v", confPath, err)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{binDir}, cacheDir, nil)
	var mu sync.Mutex
	out := json.NewEncoder(os.Stdout)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var r request
		if err := json.Unmarshal(in.Bytes(), &r); err != nil {
			fail("request: %v", err)
		}
		go func(r request) {
			rt := &libcni.RuntimeConf{
				ContainerID: r.Cid, NetNS: r.NetNS, IfName: r.IfName, CacheDir: cacheDir,
				Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", r.PodNs},
					{"K8S_POD_NAME", r.Pod}, {"K8S_POD_INFRA_CONTAINER_ID", r.Cid}},
				CapabilityArgs: map[string]interface{}{},
			}
			ctx := context.Background()
			var err error
			t := time.Now()
			switch r.Cmd {
			case "add":
				_, err = cni.AddNetworkList(ctx, list, rt)
			case "del":
				err = cni.DelNetworkList(ctx, list, rt)
			default:
				err = fmt.Errorf("unknown command %q", r.Cmd)
			}
			rep := reply{ID: r.ID, OK: err == nil, Ms: float64(time.Since(t).Microseconds()) / 1000}
			if err != nil {
				rep.Err = err.Error()
			}
			mu.Lock()
			_ = out.Encode(rep)
			mu.Unlock()
		}(r)
	}
}

func main() {
	if len(os.Args) == 5 && os.Args[1] == "serve" {
		serve(os.Args[2], os.Args[3], os.Args[4])
		return
	}
	if len(os.Args) < 10 {
		fail("usage: cniclient add|check|del CONFLIST BINDIR CACHEDIR CONTAINERID NETNS IFNAME PODNS PODNAME [PORTMAPPINGS_JSON]")
	}
	cmd, confPath, binDir, cacheDir := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	cid, netns, ifname, podNs, podName := os.Args[5], os.Args[6], os.Args[7], os.Args[8], os.Args[9]

	list, err := libcni.ConfListFromFile(confPath)
	if err != nil {
		fail("load %s: %v", confPath, err)
	}
	rt := &libcni.RuntimeConf{
		ContainerID: cid,
		NetNS:       netns,
		IfName:      ifname,
		CacheDir:    cacheDir,
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", podNs},
			{"K8S_POD_NAME", podName},
			{"K8S_POD_INFRA_CONTAINER_ID", cid},
		},
		CapabilityArgs: map[string]interface{}{},
	}
	if len(os.Args) > 10 && os.Args[10] != "" {
		var pm []map[string]interface{}
		if err := json.Unmarshal([]byte(os.Args[10]), &pm); err != nil {
			fail("port mappings: %v", err)
		}
		rt.CapabilityArgs["portMappings"] = pm
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{binDir}, cacheDir, nil)
	ctx := context.Background()
	switch cmd {
	case "add":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail("ADD: %v", err)
		}
		if err := res.Print(); err != nil {
			fail("print: %v", err)
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail("CHECK: %v", err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail("DEL: %v", err)
		}
	default:
		fail("unknown command %q", cmd)
	}
}
