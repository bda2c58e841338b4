"""Generated protobuf modules (see cni_agent/protogen.py). Do not edit by hand."""
