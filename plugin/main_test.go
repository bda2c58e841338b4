package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// runShim executes the shim logic in-process with a fixed environment.
func runShim(t *testing.T, env map[string]string, stdin string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	sh := &shim{getenv: lookup, stdout: &stdout, stderr: &stderr, cmd: env["CNI_COMMAND"]}
	code := sh.run(strings.NewReader(stdin))
	return code, stdout.String(), stderr.String()
}

func decode(t *testing.T, s string) map[string]interface{} {
	t.Helper()
	var m map[string]interface{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatalf("stdout is not one JSON object: %q: %v", s, err)
	}
	return m
}

func TestParseSettings(t *testing.T) {
	def := defaultSettings()
	cases := []struct {
		name     string
		stdin    string
		want     func(*settings)
		warnings int
	}{
		{"empty stdin", "", func(s *settings) {}, 0},
		{"invalid JSON", "{nope", func(s *settings) {}, 0},
		{"JSON array", "[1]", func(s *settings) {}, 0},
		{"defaults", `{"cniVersion":"1.0.0"}`, func(s *settings) { s.Valid = true; s.CNIVersion = "1.0.0" }, 0},
		{"all keys", `{"cniVersion":"0.4.0","agent_socket":"/x/p.sock","exclude_namespaces":["a","b"],
			"pod_namespace":"ns","pod_name_prefix":"pre-","timeout_seconds":1.5,"status_gate":"never",
			"prevResult":{"ips":[]}}`, func(s *settings) {
			s.Valid = true
			s.CNIVersion = "0.4.0"
			s.AgentSocket = "/x/p.sock"
			s.ExcludeNamespaces = []string{"a", "b"}
			s.PodNamespace = "ns"
			s.PodNamePrefix = "pre-"
			s.Timeout = 1500 * time.Millisecond
			s.StatusGate = "never"
			s.PrevResult = json.RawMessage(`{"ips":[]}`)
		}, 0},
		{"empty exclude list is honoured", `{"exclude_namespaces":[]}`, func(s *settings) {
			s.Valid = true
			s.ExcludeNamespaces = []string{}
		}, 0},
		{"wrong types keep defaults", `{"agent_socket":5,"exclude_namespaces":"kube-system","timeout_seconds":"3",
			"status_gate":"sometimes","pod_namespace":[]}`, func(s *settings) { s.Valid = true }, 5},
		{"non-positive timeout", `{"timeout_seconds":0}`, func(s *settings) { s.Valid = true }, 1},
		{"null prevResult", `{"prevResult":null}`, func(s *settings) { s.Valid = true }, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			want := def
			want.ExcludeNamespaces = append([]string(nil), def.ExcludeNamespaces...)
			tc.want(&want)
			got, warnings := parseSettings([]byte(tc.stdin))
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got %+v\nwant %+v", got, want)
			}
			if len(warnings) != tc.warnings {
				t.Errorf("warnings %q, want %d", warnings, tc.warnings)
			}
		})
	}
}

func TestPodFromArgs(t *testing.T) {
	cases := []struct{ args, ns, name string }{
		{"", "", ""},
		{"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_UID=u", "default", "web-1"},
		{"K8S_POD_NAME=only", "", "only"},
		{"garbage;K8S_POD_NAMESPACE=ns;;x", "ns", ""},
		{"K8S_POD_NAME=a=b", "", "a=b"},
		{"k8s_pod_namespace=lower", "", ""},
	}
	for _, tc := range cases {
		ns, name := podFromArgs(tc.args)
		if ns != tc.ns || name != tc.name {
			t.Errorf("podFromArgs(%q) = %q, %q; want %q, %q", tc.args, ns, name, tc.ns, tc.name)
		}
	}
}

func TestFallbackWithoutAgent(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "plugin.sock") // never created: connect fails
	conf := func(version, extra string) string {
		return `{"cniVersion":"` + version + `","name":"k8s-pod-network","type":"ambient-cni","agent_socket":"` +
			sock + `","pod_namespace":"istio-system","exclude_namespaces":["kube-system"]` + extra + `}`
	}
	base := func(cmd, args string) map[string]string {
		return map[string]string{"CNI_COMMAND": cmd, "CNI_CONTAINERID": "abc", "CNI_NETNS": "/var/run/netns/x",
			"CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": args}
	}
	prev := `,"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.5/24"}]}`
	cases := []struct {
		name      string
		env       map[string]string
		stdin     string
		exit      int
		code      float64 // 0: expect success output
		stdout    string  // exact stdout for successes ("" = none)
		msgSubstr string
	}{
		{"ADD regular pod fails closed", base("ADD", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
			conf("1.0.0", prev), 1, 11, "", "unreachable at " + sock},
		{"ADD non-kubernetes fails closed", base("ADD", ""), conf("1.0.0", ""), 1, 11, "", sock},
		{"ADD excluded namespace passes", base("ADD", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns"),
			conf("1.1.0", prev), 0, 0, `{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.5/24"}]}` + "\n", ""},
		{"ADD own pod passes", base("ADD", "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=ambient-cni-node-x1"),
			conf("1.0.0", ""), 0, 0, `{"cniVersion":"1.0.0"}` + "\n", ""},
		{"ADD own namespace other pod fails", base("ADD", "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=istiod-1"),
			conf("1.0.0", ""), 1, 11, "", "unreachable"},
		{"ADD invalid JSON", base("ADD", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=a"), "{", 1, 6, "", "decode"},
		{"DEL succeeds silently", base("DEL", ""), conf("1.0.0", prev), 0, 0, "", ""},
		{"DEL with garbage succeeds", base("DEL", ""), "garbage", 0, 0, "", ""},
		{"GC succeeds silently", map[string]string{"CNI_COMMAND": "GC"}, conf("1.1.0", ""), 0, 0, "", ""},
		{"CHECK fails retryable", base("CHECK", ""), conf("1.0.0", ""), 1, 11, "", "unreachable"},
		{"VERSION echoes", map[string]string{"CNI_COMMAND": "VERSION"}, `{"cniVersion":"0.4.0"}`, 0, 0,
			`{"cniVersion":"0.4.0","supportedVersions":["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}` + "\n", ""},
		{"VERSION unknown version", map[string]string{"CNI_COMMAND": "VERSION"}, `{"cniVersion":"9.9.9"}`, 0, 0,
			`{"cniVersion":"1.1.0","supportedVersions":["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}` + "\n", ""},
		{"STATUS boot gate without marker", map[string]string{"CNI_COMMAND": "STATUS"}, conf("1.1.0", ""), 1, 50, "", "not ready"},
		{"STATUS gate never", map[string]string{"CNI_COMMAND": "STATUS"}, conf("1.1.0", `,"status_gate":"never"`), 0, 0, "", ""},
		{"missing CNI_COMMAND", map[string]string{}, conf("1.0.0", ""), 1, 4, "", "CNI_COMMAND"},
		{"bogus CNI_COMMAND", map[string]string{"CNI_COMMAND": "FROB"}, conf("1.0.0", ""), 1, 4, "", "FROB"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			exit, stdout, _ := runShim(t, tc.env, tc.stdin)
			if time.Since(start) > 2*time.Second {
				t.Errorf("fallback took %v", time.Since(start))
			}
			if exit != tc.exit {
				t.Fatalf("exit %d, want %d (stdout %q)", exit, tc.exit, stdout)
			}
			if tc.code == 0 {
				if stdout != tc.stdout {
					t.Fatalf("stdout %q, want %q", stdout, tc.stdout)
				}
				return
			}
			got := decode(t, stdout)
			if got["code"] != tc.code || !strings.Contains(got["msg"].(string), tc.msgSubstr) {
				t.Fatalf("error %v, want code %v and msg containing %q", got, tc.code, tc.msgSubstr)
			}
			if _, ok := got["cniVersion"].(string); !ok {
				t.Fatalf("error without cniVersion: %v", got)
			}
		})
	}
}

func TestStatusBootMarkerAndAlwaysGate(t *testing.T) {
	dir := t.TempDir()
	conf := `{"cniVersion":"1.1.0","agent_socket":"` + filepath.Join(dir, "plugin.sock") + `"`
	env := map[string]string{"CNI_COMMAND": "STATUS"}
	if err := os.WriteFile(filepath.Join(dir, readyMarker), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if exit, stdout, _ := runShim(t, env, conf+"}"); exit != 0 || stdout != "" {
		t.Fatalf("with marker: exit %d stdout %q", exit, stdout)
	}
	exit, stdout, _ := runShim(t, env, conf+`,"status_gate":"always"}`)
	if exit != 1 || decode(t, stdout)["code"] != float64(50) {
		t.Fatalf("gate always: exit %d stdout %q", exit, stdout)
	}
}

func TestStdinTooLarge(t *testing.T) {
	big := `{"cniVersion":"1.0.0","pad":"` + strings.Repeat("x", maxStdin) + `"}`
	exit, stdout, _ := runShim(t, map[string]string{"CNI_COMMAND": "ADD"}, big)
	got := decode(t, stdout)
	if exit != 1 || got["code"] != float64(7) || got["msg"] != "stdin exceeds 1 MiB" {
		t.Fatalf("exit %d, %v", exit, got)
	}
	if exit, stdout, _ := runShim(t, map[string]string{"CNI_COMMAND": "DEL"}, big); exit != 0 || stdout != "" {
		t.Fatalf("DEL must succeed: exit %d stdout %q", exit, stdout)
	}
}

// fakeAgent accepts one connection, records the request and answers with reply (or stalls).
func fakeAgent(t *testing.T, reply string) (string, <-chan []byte) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "plugin.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan []byte, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		data, _ := io.ReadAll(conn)
		got <- data
		if reply == "" {
			time.Sleep(3 * time.Second)
			return
		}
		conn.Write([]byte(reply))
	}()
	return sock, got
}

func TestForwardExactRequestAndReply(t *testing.T) {
	sock, got := fakeAgent(t, `{"exit_code": 3, "stdout": "{\"cniVersion\":\"1.0.0\"}", "stderr": "agent says hi"}`)
	stdin := `{"cniVersion":"1.0.0","name":"n","agent_socket":"` + sock + `"}`
	env := map[string]string{"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/1/ns/net",
		"CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAME=x", "CNI_PATH": "/opt/cni/bin", "UNRELATED": "no"}
	exit, stdout, stderr := runShim(t, env, stdin)
	if exit != 3 || stdout != `{"cniVersion":"1.0.0"}` || !strings.Contains(stderr, "agent says hi\n") {
		t.Fatalf("exit %d stdout %q stderr %q", exit, stdout, stderr)
	}
	var req map[string]interface{}
	if err := json.Unmarshal(<-got, &req); err != nil {
		t.Fatal(err)
	}
	want := map[string]interface{}{
		"v": float64(1),
		"env": map[string]interface{}{"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/1/ns/net",
			"CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAME=x", "CNI_PATH": "/opt/cni/bin"},
		"stdin_b64": base64.StdEncoding.EncodeToString([]byte(stdin)),
	}
	if !reflect.DeepEqual(req, want) {
		t.Fatalf("request %v\nwant %v", req, want)
	}
}

func TestForwardOnlySetEnv(t *testing.T) {
	sock, got := fakeAgent(t, `{"exit_code": 0, "stdout": "", "stderr": ""}`)
	exit, stdout, _ := runShim(t, map[string]string{"CNI_COMMAND": "STATUS", "CNI_NETNS": ""},
		`{"cniVersion":"1.1.0","agent_socket":"`+sock+`"}`)
	if exit != 0 || stdout != "" {
		t.Fatalf("exit %d stdout %q", exit, stdout)
	}
	var req wireRequest
	if err := json.Unmarshal(<-got, &req); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(req.Env, map[string]string{"CNI_COMMAND": "STATUS", "CNI_NETNS": ""}) {
		t.Fatalf("env %v", req.Env)
	}
}

func TestAgentTimeoutAndMalformedReply(t *testing.T) {
	for _, reply := range []string{"", `{"stdout": "x"}`, `not json`} {
		sock, _ := fakeAgent(t, reply)
		start := time.Now()
		exit, stdout, _ := runShim(t, map[string]string{"CNI_COMMAND": "ADD", "CNI_ARGS": "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"},
			`{"cniVersion":"1.0.0","timeout_seconds":0.3,"agent_socket":"`+sock+`"}`)
		if elapsed := time.Since(start); elapsed > 2*time.Second {
			t.Errorf("reply %q: took %v despite 0.3 s timeout", reply, elapsed)
		}
		got := decode(t, stdout)
		if exit != 1 || got["code"] != float64(11) || !strings.Contains(got["details"].(string), "pod a/b") {
			t.Fatalf("reply %q: exit %d %v", reply, exit, got)
		}
	}
}

func TestPassThrough(t *testing.T) {
	out, err := passThrough(json.RawMessage(`{"cniVersion":"0.4.0","dns":{},"ips":[]}`), "1.0.0")
	if err != nil || string(out) != `{"cniVersion":"1.0.0","dns":{},"ips":[]}` {
		t.Fatalf("%s %v", out, err)
	}
	if out, _ := passThrough(nil, ""); string(out) != `{"cniVersion":"1.1.0"}` {
		t.Fatalf("%s", out)
	}
	if _, err := passThrough(json.RawMessage(`[1]`), "1.0.0"); err == nil {
		t.Fatal("array prevResult accepted")
	}
}

func TestDelNeverFailsEvenWhenAgentSaysSo(t *testing.T) {
	// e.g. an agent of another version refusing the envelope: DEL still exits 0 with empty stdout
	sock, _ := fakeAgent(t, `{"exit_code": 1, "stdout": "{\"code\":6,\"msg\":\"unsupported shim protocol version 2\"}", "stderr": ""}`)
	exit, stdout, stderr := runShim(t, map[string]string{"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"},
		`{"cniVersion":"1.0.0","agent_socket":"`+sock+`"}`)
	if exit != 0 || stdout != "" || !strings.Contains(stderr, "unsupported shim protocol version 2") {
		t.Fatalf("exit %d stdout %q stderr %q", exit, stdout, stderr)
	}
	// and the same reply for ADD is passed through as a failure
	sock, _ = fakeAgent(t, `{"exit_code": 1, "stdout": "{\"code\":6}", "stderr": ""}`)
	if exit, _, _ := runShim(t, map[string]string{"CNI_COMMAND": "ADD"}, `{"cniVersion":"1.0.0","agent_socket":"`+sock+`"}`); exit != 1 {
		t.Fatalf("ADD exit %d, want 1", exit)
	}
}
