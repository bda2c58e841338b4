"""cni-agent: the node agent of Istio's ambient data plane.

The package is layered (see .importlinter): pure core (protocols, rule sets, requests, policy),
adapters (kernel, sockets, API server), the orchestrator (agent.py), and the edges (cli, ops).
"""

__version__ = "0.1.0"
