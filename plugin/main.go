// Command ambient-cni is the chained CNI plugin of cni-agent.
//
// The container runtime execs it on the host, where Python may be absent, so it is a static
// standard-library binary that owns no CNI semantics: it forwards the environment and stdin to
// the agent over a Unix socket and prints the agent's answer verbatim. Only when the agent cannot
// be reached does it decide anything itself, and then it chooses the safe outcome for each verb:
// DEL and GC succeed (so runtimes can always tear pods down), ADD fails closed (so no pod starts
// without redirection) except for pods that must start while the agent is down (the agent's own
// pods and excluded namespaces), and STATUS follows the boot gate from the spec.
//
// Wire protocol (one request, one reply per connection): the shim writes
//
//	{"v": 1, "env": {"CNI_COMMAND": ..., ...}, "stdin_b64": "<base64 of stdin>"}
//
// half-closes, and reads {"exit_code": N, "stdout": "...", "stderr": "..."}.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

const (
	protocolVersion     = 1
	defaultSocket       = "/var/run/ambient-cni/plugin.sock"
	defaultTimeout      = 20 * time.Second
	shortTimeout        = 5 * time.Second // every verb but ADD: they must not stall the runtime
	maxStdin            = 1 << 20
	maxReply            = 8 << 20
	currentVersion      = "1.1.0"
	readyMarker         = "ready"
	defaultPodNamespace = "istio-system"
	defaultPodPrefix    = "ambient-cni-node-"

	codeIncompatibleVersion = 1
	codeInvalidEnv          = 4
	codeIOFailure           = 5
	codeDecodeFailure       = 6
	codeInvalidConfig       = 7
	codeTryAgainLater       = 11
	codeNotAvailable        = 50
)

// supportedVersions is printed in this order by VERSION (spec §4).
var supportedVersions = []string{"0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// forwardedEnv are the only variables the agent needs; anything else stays private to the host.
var forwardedEnv = []string{"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"}

var errStdinTooLarge = errors.New("stdin exceeds 1 MiB")

// settings are the keys of our conflist entry that the shim itself needs.
type settings struct {
	AgentSocket       string
	ExcludeNamespaces []string
	PodNamespace      string
	PodNamePrefix     string
	Timeout           time.Duration
	StatusGate        string
	CNIVersion        string
	PrevResult        json.RawMessage
	// Valid is false when stdin is not a JSON object; the agent then reports the decode error.
	Valid bool
}

func defaultSettings() settings {
	return settings{
		AgentSocket:       defaultSocket,
		ExcludeNamespaces: []string{"kube-system"},
		PodNamespace:      defaultPodNamespace,
		PodNamePrefix:     defaultPodPrefix,
		Timeout:           defaultTimeout,
		StatusGate:        "boot",
	}
}

// parseSettings reads our keys leniently: a wrong type keeps the default and yields a warning,
// because refusing here would break DEL and the agent validates the config properly anyway.
func parseSettings(stdin []byte) (settings, []string) {
	s := defaultSettings()
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(stdin, &raw); err != nil || raw == nil {
		return s, nil
	}
	s.Valid = true
	var warnings []string
	field := func(key string, dst interface{}) bool {
		v, ok := raw[key]
		if !ok || string(v) == "null" {
			return false
		}
		if err := json.Unmarshal(v, dst); err != nil {
			warnings = append(warnings, fmt.Sprintf("ignoring %s=%s: %v", key, v, err))
			return false
		}
		return true
	}
	var str string
	if field("agent_socket", &str) && str != "" {
		s.AgentSocket = str
	}
	var list []string
	if field("exclude_namespaces", &list) {
		s.ExcludeNamespaces = list
	}
	str = ""
	if field("pod_namespace", &str) {
		s.PodNamespace = str
	}
	str = ""
	if field("pod_name_prefix", &str) {
		s.PodNamePrefix = str
	}
	var seconds float64
	if field("timeout_seconds", &seconds) {
		if seconds > 0 {
			s.Timeout = time.Duration(seconds * float64(time.Second))
		} else {
			warnings = append(warnings, fmt.Sprintf("ignoring timeout_seconds=%v: must be > 0", seconds))
		}
	}
	str = ""
	if field("status_gate", &str) {
		switch str {
		case "boot", "always", "never":
			s.StatusGate = str
		default:
			warnings = append(warnings, fmt.Sprintf("ignoring status_gate=%q: want boot, always or never", str))
		}
	}
	str = ""
	if field("cniVersion", &str) {
		s.CNIVersion = str
	}
	if v, ok := raw["prevResult"]; ok && string(v) != "null" {
		s.PrevResult = v
	}
	return s, warnings
}

// podFromArgs reads the pod identity from CNI_ARGS, skipping anything malformed: the agent is
// the strict parser; the shim only needs these two keys for its fallback decision.
func podFromArgs(args string) (namespace, name string) {
	for _, pair := range strings.Split(args, ";") {
		kv := strings.SplitN(pair, "=", 2)
		if len(kv) != 2 {
			continue
		}
		switch kv[0] {
		case "K8S_POD_NAMESPACE":
			namespace = kv[1]
		case "K8S_POD_NAME":
			name = kv[1]
		}
	}
	return namespace, name
}

func isSupported(version string) bool {
	for _, v := range supportedVersions {
		if v == version {
			return true
		}
	}
	return false
}

// errorVersion is the cniVersion printed in error JSON: the config's when we understand it.
func (s settings) errorVersion() string {
	if isSupported(s.CNIVersion) {
		return s.CNIVersion
	}
	return currentVersion
}

type cniError struct {
	Code    int
	Msg     string
	Details string
}

type wireRequest struct {
	V        int               `json:"v"`
	Env      map[string]string `json:"env"`
	StdinB64 string            `json:"stdin_b64"`
}

type wireReply struct {
	ExitCode *int   `json:"exit_code"`
	Stdout   string `json:"stdout"`
	Stderr   string `json:"stderr"`
}

// readBounded reads at most limit bytes, failing instead of truncating a larger input.
func readBounded(r io.Reader, limit int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, errStdinTooLarge
	}
	return data, nil
}

// forward performs one exchange with the agent; the deadline covers connect, send and reply.
func forward(socket string, body []byte, timeout time.Duration) (wireReply, error) {
	deadline := time.Now().Add(timeout)
	dialer := net.Dialer{Deadline: deadline}
	conn, err := dialer.Dial("unix", socket)
	if err != nil {
		return wireReply{}, err
	}
	defer conn.Close()
	if err := conn.SetDeadline(deadline); err != nil {
		return wireReply{}, err
	}
	_, werr := conn.Write(body)
	if werr == nil {
		if uc, ok := conn.(*net.UnixConn); ok {
			werr = uc.CloseWrite()
		}
	}
	// Read the reply even after a failed write: the agent may have answered and closed early.
	var reply wireReply
	if err := json.NewDecoder(io.LimitReader(conn, maxReply)).Decode(&reply); err != nil {
		if werr != nil {
			return wireReply{}, fmt.Errorf("sending request: %w", werr)
		}
		return wireReply{}, fmt.Errorf("reading reply: %w", err)
	}
	if reply.ExitCode == nil {
		return wireReply{}, errors.New("malformed reply: no exit_code")
	}
	return reply, nil
}

type shim struct {
	getenv func(string) (string, bool)
	stdout io.Writer
	stderr io.Writer
	cmd    string
	s      settings
}

func (sh *shim) warn(format string, a ...interface{}) {
	fmt.Fprintf(sh.stderr, "ambient-cni: "+format+"\n", a...)
}

// fail prints the CNI error JSON and returns the exit code. DEL never fails (spec §7: a failing
// DEL stops the chain and leaks the pod's IP), so for DEL the error only goes to stderr.
func (sh *shim) fail(e cniError) int {
	if sh.cmd == "DEL" {
		sh.warn("DEL: ignoring error %d: %s (%s)", e.Code, e.Msg, e.Details)
		return 0
	}
	out, _ := json.Marshal(struct {
		CNIVersion string `json:"cniVersion"`
		Code       int    `json:"code"`
		Msg        string `json:"msg"`
		Details    string `json:"details,omitempty"`
	}{sh.s.errorVersion(), e.Code, e.Msg, e.Details})
	sh.stdout.Write(append(out, '\n'))
	return 1
}

func (sh *shim) printJSON(v interface{}) int {
	out, err := json.Marshal(v)
	if err != nil {
		return sh.fail(cniError{codeTryAgainLater, "ambient-cni: encoding result", err.Error()})
	}
	sh.stdout.Write(append(out, '\n'))
	return 0
}

func (sh *shim) run(stdin io.Reader) int {
	data, err := readBounded(stdin, maxStdin)
	if errors.Is(err, errStdinTooLarge) {
		return sh.fail(cniError{codeInvalidConfig, "stdin exceeds 1 MiB", "the network configuration is too large"})
	} else if err != nil {
		return sh.fail(cniError{codeIOFailure, "reading stdin", err.Error()})
	}
	var warnings []string
	sh.s, warnings = parseSettings(data)
	for _, w := range warnings {
		sh.warn("warning: %s", w)
	}

	env := map[string]string{}
	for _, name := range forwardedEnv {
		if v, ok := sh.getenv(name); ok {
			env[name] = v
		}
	}
	body, err := json.Marshal(wireRequest{V: protocolVersion, Env: env, StdinB64: base64.StdEncoding.EncodeToString(data)})
	if err != nil {
		return sh.fail(cniError{codeIOFailure, "encoding request", err.Error()})
	}
	timeout := sh.s.Timeout
	if sh.cmd != "ADD" && timeout > shortTimeout {
		timeout = shortTimeout
	}
	reply, err := forward(sh.s.AgentSocket, body, timeout)
	if err != nil {
		return sh.fallback(err)
	}
	code := *reply.ExitCode
	if sh.cmd == "DEL" && code != 0 {
		// DEL must never fail (a failed DEL stops the chain and leaks the pod's IP), whatever an
		// agent of another version says: keep its words for the log, report success.
		io.WriteString(sh.stderr, "ambient-cni: DEL: agent reported a failure; ignoring it: "+reply.Stdout+"\n")
		reply.Stdout, code = "", 0
	}
	io.WriteString(sh.stdout, reply.Stdout)
	if reply.Stderr != "" {
		io.WriteString(sh.stderr, reply.Stderr)
		if !strings.HasSuffix(reply.Stderr, "\n") {
			io.WriteString(sh.stderr, "\n")
		}
	}
	return code
}

func (sh *shim) unreachable(cause error, pod string) cniError {
	return cniError{
		Code: codeTryAgainLater,
		Msg:  fmt.Sprintf("ambient-cni agent unreachable at %s: %v", sh.s.AgentSocket, cause),
		Details: fmt.Sprintf("%sis the cni-agent DaemonSet pod (ambient-cni-node in namespace %s) running on this node? "+
			"Check its logs and that %s exists; the runtime retries this pod", pod, sh.s.PodNamespace, sh.s.AgentSocket),
	}
}

// fallback decides locally when the agent is down; see the package comment for the policy.
func (sh *shim) fallback(cause error) int {
	if sh.cmd != "VERSION" {
		sh.warn("agent unreachable at %s: %v", sh.s.AgentSocket, cause)
	}
	switch sh.cmd {
	case "VERSION":
		version := sh.s.CNIVersion
		if !isSupported(version) {
			version = currentVersion
		}
		return sh.printJSON(map[string]interface{}{"cniVersion": version, "supportedVersions": supportedVersions})
	case "DEL", "GC":
		return 0
	case "CHECK":
		return sh.fail(sh.unreachable(cause, ""))
	case "STATUS":
		return sh.status()
	case "ADD":
		return sh.add(cause)
	case "":
		return sh.fail(cniError{codeInvalidEnv, "CNI_COMMAND is not set", "the runtime must set CNI_COMMAND"})
	default:
		return sh.fail(cniError{codeInvalidEnv, fmt.Sprintf("CNI_COMMAND %q is invalid", sh.cmd),
			"want ADD, DEL, CHECK, STATUS, VERSION or GC"})
	}
}

func (sh *shim) status() int {
	notReady := cniError{codeNotAvailable, "ambient-cni agent is not ready",
		fmt.Sprintf("no agent answers at %s", sh.s.AgentSocket)}
	switch sh.s.StatusGate {
	case "never":
		return 0
	case "always":
		return sh.fail(notReady)
	}
	// Boot gate: the agent writes the marker on tmpfs when it is first ready, so after that an
	// agent restart does not mark the node's network not-ready (which would taint the node).
	if _, err := os.Stat(filepath.Join(filepath.Dir(sh.s.AgentSocket), readyMarker)); err == nil {
		return 0
	}
	notReady.Details += " and it has not been ready since boot"
	return sh.fail(notReady)
}

func (sh *shim) add(cause error) int {
	if !sh.s.Valid {
		return sh.fail(cniError{codeDecodeFailure, "failed to decode network configuration",
			"stdin is not a JSON object (and the agent is unreachable)"})
	}
	args, _ := sh.getenv("CNI_ARGS")
	ns, name := podFromArgs(args)
	ownPod := ns != "" && ns == sh.s.PodNamespace && sh.s.PodNamePrefix != "" && strings.HasPrefix(name, sh.s.PodNamePrefix)
	excluded := false
	for _, x := range sh.s.ExcludeNamespaces {
		excluded = excluded || (ns != "" && x == ns)
	}
	if !ownPod && !excluded {
		pod := ""
		if ns != "" || name != "" {
			pod = fmt.Sprintf("pod %s/%s: ", ns, name)
		}
		return sh.fail(sh.unreachable(cause, pod))
	}
	result, err := passThrough(sh.s.PrevResult, sh.s.CNIVersion)
	if err != nil {
		return sh.fail(cniError{codeDecodeFailure, "failed to decode prevResult", err.Error()})
	}
	sh.stdout.Write(append(result, '\n'))
	return 0
}

// passThrough re-emits prevResult unchanged except for cniVersion (spec §6), or an empty result.
func passThrough(prev json.RawMessage, version string) ([]byte, error) {
	if version == "" {
		version = currentVersion
	}
	result := map[string]json.RawMessage{}
	if len(bytes.TrimSpace(prev)) > 0 {
		if err := json.Unmarshal(prev, &result); err != nil {
			return nil, err
		}
	}
	v, _ := json.Marshal(version)
	result["cniVersion"] = v
	return json.Marshal(result)
}

func main() {
	cmd, _ := os.LookupEnv("CNI_COMMAND")
	sh := &shim{getenv: os.LookupEnv, stdout: os.Stdout, stderr: os.Stderr, cmd: cmd}
	os.Exit(sh.run(os.Stdin))
}
