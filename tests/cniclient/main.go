// cniclient drives a CNI conflist through libcni, the library container runtimes use, so
// tests call aws-cni (and the plugins chained after it) exactly as containerd or CRI-O would.
//
// Usage: cniclient add|check|del CONFLIST BINDIR CACHEDIR CONTAINERID NETNS IFNAME PODNS PODNAME [PORTMAPPINGS_JSON]
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/containernetworking/cni/libcni"
)

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	os.Exit(1)
}

func main() {
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
